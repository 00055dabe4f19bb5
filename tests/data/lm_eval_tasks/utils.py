"""Loads the demo tasks' items from the .jsonl files next to this file, wherever lm-eval runs
(a `dataset_path: json` task would resolve data_files against the working directory)."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    with open(HERE / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:
    return _load("me_demo_mc")


def load_gen(**kwargs) -> datasets.DatasetDict:
    return _load("me_demo_gen")


def load_ppl(**kwargs) -> datasets.DatasetDict:
    return _load("me_demo_ppl")
