"""Benchmark session controls for a timed GPU run (bench/gpu_suite.sh sets them).

ME_BENCH_SECONDS: once this many seconds have passed in the session, the remaining cases are
    skipped (not killed), so pytest-benchmark still writes the JSON of everything measured.
ME_BENCH_PRIORITY: '|'-separated substrings of test ids; matching cases run first, in the order
    of the patterns (the issues' target cases), the rest after them in their usual order.
"""
from __future__ import annotations

import os
import time

import pytest

_START = time.monotonic()


def pytest_collection_modifyitems(config, items):
    patterns = [p for p in os.environ.get("ME_BENCH_PRIORITY", "").split("|") if p]
    if not patterns:
        return

    def rank(item):
        return next((i for i, p in enumerate(patterns) if p in item.nodeid), len(patterns))

    items.sort(key=rank)  # stable: the usual order within a rank


@pytest.fixture(autouse=True)
def _bench_time_budget():
    budget = os.environ.get("ME_BENCH_SECONDS")
    if budget and time.monotonic() - _START > float(budget):
        pytest.skip(f"benchmark time budget spent (ME_BENCH_SECONDS={budget})")
