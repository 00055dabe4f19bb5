"""Overhead of the lm-evaluation-harness adapter: requests per second through EnsembleLM vs the
same requests given to the Ensemble directly (target: the adapter at >= 0.9x).

    TRITON_INTERPRET=0 python bench/harness_overhead.py --out bench/results/cpu-2026-11-30/harness_overhead.json

The requests are the demo tasks' (tests/data/lm_eval_tasks) on the demo members, CPU, one thread:
  * loglikelihood: the 160 (context, choice) pairs of me_demo_mc; direct = Ensemble.score in
    batches of the same size, in the tasks' order;
  * loglikelihood_rolling: the 6 documents of me_demo_ppl; direct = Ensemble.score_rolling;
  * generate_until (greedy, until "\\n", 16 tokens): the 16 contexts of me_demo_gen; direct =
    Ensemble.generate(method="ce", temperature=0, stop=["\\n"]).
The adapter's extra work is lm-eval's tokenization rule (two encodings per pair), sorting and
bookkeeping; its sorting by length can also make it faster than the unsorted direct calls.
Each measurement is the best of --repeats runs (after one warm-up run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _batches(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from lm_eval.api.instance import Instance

    from me_runtime import Ensemble, demo_members
    from me_runtime.harness import EnsembleLM

    ensemble = Ensemble.from_pretrained(demo_members(), dtype=torch.float32, engine=args.engine)
    lm = EnsembleLM(ensemble, method="me", batch_size=args.batch_size)
    bs = args.batch_size

    mc = [(r["context"], c) for r in _rows("me_demo_mc") for c in r["choices"]]
    ll_requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(mc)]
    texts = [r["text"] for r in _rows("me_demo_ppl")]
    rolling_requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    contexts = [r["context"] for r in _rows("me_demo_gen")]
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    gen_requests = [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]

    cases = {
        "loglikelihood": (
            len(mc),
            lambda: lm.loglikelihood(ll_requests, disable_tqdm=True),
            lambda: [ensemble.score([c for c, _ in b], [x for _, x in b]) for b in _batches(mc, bs)],
        ),
        "loglikelihood_rolling": (
            len(texts),
            lambda: lm.loglikelihood_rolling(rolling_requests, disable_tqdm=True),
            lambda: [ensemble.score_rolling(b) for b in _batches(texts, bs)],
        ),
        "generate_until": (
            len(contexts),
            lambda: lm.generate_until(gen_requests, disable_tqdm=True),
            lambda: [ensemble.generate(b, method="ce", temperature=0.0, max_new_tokens=16, stop=["\n"], seed=0)
                     for b in _batches(contexts, bs)],
        ),
    }
    results = {}
    for name, (count, through_harness, direct) in cases.items():
        t_harness = _best(through_harness, args.repeats)
        t_direct = _best(direct, args.repeats)
        results[name] = {
            "requests": count,
            "harness_requests_per_s": count / t_harness,
            "direct_requests_per_s": count / t_direct,
            "ratio": t_direct / t_harness,
        }
        print(f"{name:24s} harness {count / t_harness:8.2f} req/s   direct {count / t_direct:8.2f} req/s   "
              f"ratio {t_direct / t_harness:.3f}", flush=True)
    report = {
        "what": "requests/s through EnsembleLM vs the same requests given to the Ensemble directly",
        "target_ratio": 0.9,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "engine": ensemble.engine,
        "dtype": "float32",
        "batch_size": bs,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
