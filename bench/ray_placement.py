"""placement="ray" against placement="local" and against the seed's Ray design, on the CPU.

    python bench/ray_placement.py --out bench/results/cpu-2026-11-30/ray_placement.json

Rows, side by side in one run (best of --repeats timed runs after one warm-up each), for batch 1
and 8, ME and CE, on the embedded demo members in fp32 with one torch thread per process:

* local: `Ensemble.from_pretrained(..., placement="local").generate_ids` in this process.
* ray: `Ensemble.from_pretrained(..., placement="ray")`: one actor per member, the driver's step
  loop (ME: one call per member that runs, token ids in and out; CE: logits to the driver).
* seed: the design of the paper's reference code, re-implemented here (`SeedMember`): every member
  in a Ray actor running its Hugging Face forward with a DynamicCache over its pending tokens and
  returning the FULL next-token distribution (fp32 probabilities [V]) to the driver, which samples
  on the host (numpy, as bench/seed_algorithm.py). Per token, all blocking and in sequence:
  ME: 1 call to the drawn member (forward, distribution back), the host draw, then 1 call per
  member to append the token to its pending list (M calls): 1 + M round trips (3 for M = 2).
  CE: 1 call per member for its distribution, the host mixture and draw, then the M appends: 2M.
  Batch size 1 only, as the seed: a batch of 8 is run as 8 requests one after another.

Also measured: the round trip of an empty actor call, and the bytes each step puts on the wire.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from me_runtime import Ensemble, demo_members  # noqa: E402


class SeedMember:
    """One member as the seed's actor: a Hugging Face forward with its own cache; the full
    distribution goes back to the driver every time it runs."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, DynamicCache

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
        self.cache_cls = DynamicCache
        self.reset([])

    def reset(self, prompt: list[int]) -> None:
        self.cache = self.cache_cls()
        self.pending = list(prompt)

    def append(self, token: int) -> None:
        self.pending.append(token)

    @torch.inference_mode()
    def distribution(self) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([self.pending]), past_key_values=self.cache, use_cache=True)
        self.cache, self.pending = out.past_key_values, []
        return torch.softmax(out.logits[0, -1].float(), dim=-1).numpy()

    def ping(self) -> int:
        return 0


def seed_generate(actors, weights, prompt: list[int], new_tokens: int, method: str, seed: int) -> int:
    """One request, batch 1, the seed's round trips; returns the number of tokens generated."""
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    ray.get([a.reset.remote(prompt) for a in actors])
    for _ in range(new_tokens):
        if method == "me":
            m = int(rng.choice(len(actors), p=w))
            probs = ray.get(actors[m].distribution.remote()).astype(np.float64)
        else:
            probs = sum(wm * ray.get(a.distribution.remote()).astype(np.float64) for wm, a in zip(w, actors))
        token = int(rng.choice(probs.shape[0], p=probs / probs.sum()))
        for a in actors:
            ray.get(a.append.remote(token))
    return new_tokens


def best_of(fn, repeats: int) -> tuple[float, int]:
    """(best seconds, tokens) over `repeats` timed runs after one warm-up."""
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return min(times), tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--methods", default="me,ce")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    paths = demo_members()
    weights = [0.5, 0.5]
    local = Ensemble.from_pretrained(paths, weights, dtype="float32")
    remote = Ensemble.from_pretrained(paths, weights, dtype="float32", placement="ray",
                                      ray_options={"torch_threads": 1, "num_cpus": 0})
    run_ahead = remote.run_ahead
    seed_actors = [ray.remote(SeedMember).options(num_cpus=0).remote(path) for path in paths]
    ray.get([a.ping.remote() for a in seed_actors])
    tok = local.tokenizer
    texts = ["def parse(line):\n    return", "The ship sailed", "import os\nimport sys\n\nclass Reader:", "It was",
             "for i in range(10):", "She said that the", "    def __init__(self, name):", "Once upon a time there"]

    # the round trip of an empty actor call (median of 300)
    actor = remote.actors()[0]
    samples = []
    for _ in range(300):
        start = time.perf_counter()
        ray.get(actor.ping.remote())
        samples.append(time.perf_counter() - start)
    empty_ms = statistics.median(samples) * 1e3

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [tok(texts[i % len(texts)])["input_ids"] for i in range(batch)]
        seeds = list(range(batch))
        for method in args.methods.split(","):
            # no EOS stop: every request generates new_tokens (the same work in every row)
            kwargs = dict(method=method, max_new_tokens=args.new_tokens, seed=seeds)

            def run(ens):
                eos = ens.eos_token_ids
                ens.eos_token_ids = frozenset()
                try:
                    return sum(len(g.token_ids) for g in ens.generate_ids(prompts, **kwargs))
                finally:
                    ens.eos_token_ids = eos

            same = [g.token_ids for g in local.generate_ids(prompts, **kwargs)] == \
                [g.token_ids for g in remote.generate_ids(prompts, **kwargs)]
            local_s, local_tokens = best_of(lambda: run(local), args.repeats)
            ray_s, ray_tokens = best_of(lambda: run(remote), args.repeats)
            calls = remote.last_call_stats["calls_per_step"]
            remote.run_ahead = 0  # the protocol of one call per step and running member
            strict_s, strict_tokens = best_of(lambda: run(remote), args.repeats)
            strict_calls = remote.last_call_stats["calls_per_step"]
            remote.run_ahead = run_ahead
            busy0 = sum(ray.get([a.busy_seconds.remote() for a in remote.actors()]))
            cpu0, wall0 = time.process_time(), time.perf_counter()
            run(remote)
            cpu1, wall1 = time.process_time(), time.perf_counter()
            busy1 = sum(ray.get([a.busy_seconds.remote() for a in remote.actors()]))
            ray_breakdown = {"wall": (wall1 - wall0) / args.new_tokens * 1e3,
                             "actors_in_step": (busy1 - busy0) / args.new_tokens * 1e3,
                             "driver_cpu": (cpu1 - cpu0) / args.new_tokens * 1e3}
            seed_s, seed_tokens = best_of(
                lambda: sum(seed_generate(seed_actors, weights, prompt, args.new_tokens, method, s)
                            for prompt, s in zip(prompts, seeds)), max(1, args.repeats // 2))
            vocab = remote.vocab_size
            wire_me = 8 * batch + 16 * batch  # ~1 pending id per row in, a token + a member per row out
            wire_ce = remote.num_members * batch * vocab * 4  # fp32 logits of every row from every member
            row = {
                "batch": batch, "method": method, "new_tokens": args.new_tokens,
                "same_tokens_local_ray": same,
                "local_tok_s": local_tokens / local_s, "ray_tok_s": ray_tokens / ray_s,
                "seed_tok_s": seed_tokens / seed_s,
                "ray_over_local": (ray_tokens / ray_s) / (local_tokens / local_s),
                "ray_over_seed": (ray_tokens / ray_s) / (seed_tokens / seed_s),
                "ray_calls_per_step": sum(calls) / len(calls),
                "ray_no_run_ahead_tok_s": strict_tokens / strict_s,
                "ray_no_run_ahead_over_local": (strict_tokens / strict_s) / (local_tokens / local_s),
                "ray_no_run_ahead_over_seed": (strict_tokens / strict_s) / (seed_tokens / seed_s),
                "ray_no_run_ahead_calls_per_step": sum(strict_calls) / len(strict_calls),
                "ms_per_step": {"local": local_s / args.new_tokens * 1e3, "ray": ray_s / args.new_tokens * 1e3,
                                "seed": seed_s / (args.new_tokens * (1 if batch == 1 else batch)) * 1e3},
                "ray_ms_per_step_breakdown": ray_breakdown,
                "approx_wire_bytes_per_step": wire_me if method == "me" else wire_ce,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg(), "torch": torch.__version__, "ray": ray.__version__},
        "members": "demo (2 x 4.26M-parameter Llama, fp32, vocab 4096); one torch thread per process",
        "empty_actor_call_ms": empty_ms,
        "rows": rows,
    }
    remote.close()
    ray.shutdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"empty actor call: {empty_ms:.3f} ms")
    print("| batch | method | local tok/s | ray tok/s (calls/step) | ray, run_ahead=0 tok/s (calls/step) | seed design "
          "tok/s | ray / local | ray / seed | run_ahead=0: / local, / seed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['method']} | {r['local_tok_s']:.1f} | {r['ray_tok_s']:.1f} "
              f"({r['ray_calls_per_step']:.2f}) | {r['ray_no_run_ahead_tok_s']:.1f} "
              f"({r['ray_no_run_ahead_calls_per_step']:.2f}) | {r['seed_tok_s']:.1f} | {r['ray_over_local']:.2f}x | "
              f"{r['ray_over_seed']:.2f}x | {r['ray_no_run_ahead_over_local']:.2f}x, "
              f"{r['ray_no_run_ahead_over_seed']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
