#!/usr/bin/env bash
# The whole GPU job in one command, for a machine with one H100/H200, CUDA, and torch / triton /
# transformers preinstalled, with NO network:
#   1. builds me_kernels._C in place against that torch (no pip, no downloads);
#   2. runs the GPU tests (pytest -m gpu);
#   3. runs the end-to-end benchmark (engine rows first) and the kernel microbenchmarks (JSON);
#   4. draws the plots and prints a short summary table last.
# Usage: bench/gpu_suite.sh OUTDIR
# Fits in a 9-minute run (worst case of the limits below: about 540 s): each step has a hard limit, the benchmarks run their target cases
# first and skip (not kill) the rest when their time budget is spent, so their JSON is always
# written; e2e.py writes its JSON after every row. Set ME_SUITE_SCALE=2 (or more) to give every
# budget that factor when the machine can be held longer.
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export ME_CUDA_ARCH_LIST=${ME_CUDA_ARCH_LIST:-9.0a}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SCALE=${ME_SUITE_SCALE:-1}
budget() { echo $(($1 * SCALE)); }
STATUS="$OUTDIR/steps.tsv"
: >"$STATUS"
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== [$name] $*" | tee -a "$OUTDIR/suite.log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$OUTDIR/suite.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" "$((SECONDS - t0))" | tee -a "$STATUS"
  [ $rc -eq 0 ] || failed=1
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
  nvcc --version 2>/dev/null | tail -n 1
} | tee "$OUTDIR/env.txt"

step build "$(budget 140)" "$PY" setup.py build_ext --inplace || { echo "build failed: see $OUTDIR/suite.log"; tail -n 40 "$OUTDIR/suite.log"; exit 1; }
step import 20 "$PY" -c "import me_kernels, me_runtime; assert me_kernels.EXTENSION_LOADED; print('me_kernels._C loaded')"
step gpu-tests "$(budget 130)" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUTDIR/gpu_tests.xml"
# End to end first (the engine rows: stacked, then hf, then the baselines), the target cells first
# (M=3 at B=1 and B=32), then the rest of the grid as time allows.
CELLS="qwen2.5-1.5b:3:1,qwen2.5-1.5b:3:32,llama-3.2-1b:3:1,qwen2.5-1.5b:2:1,qwen2.5-1.5b:4:1,qwen2.5-1.5b:3:8,qwen2.5-1.5b:3:64,llama-3.2-1b:3:32"
[ -f bench/e2e.py ] && step e2e "$(budget 90)" "$PY" bench/e2e.py --cells "$CELLS" --max-seconds "$(budget 68)" --out "$OUTDIR/e2e.json"
# Exact CE by drafting against CE and ME: three bf16 "fine-tunes" of a Qwen2.5-1.5B-shaped base,
# batch 1 first (the issue's target), JSON after every case.
[ -f bench/drafting.py ] && step drafting "$(budget 45)" "$PY" bench/drafting.py --device cuda --dtype bfloat16 \
  --sets finetunes --base qwen2.5-1.5b --batches 1,8 --settings top_p=0.9,greedy,top_k=10 --repeats 1 \
  --new-tokens 64 --max-seconds "$(budget 28)" --out "$OUTDIR/drafting.json"
# Members with different tokenizers vs one shared vocabulary (the demo members: code + blend vs
# code + prose), ME and CE at batch 1 and 8.
[ -f bench/mixed_tokenizers.py ] && step mixed-tokenizers "$(budget 25)" "$PY" bench/mixed_tokenizers.py --device cuda \
  --repeats 2 --out "$OUTDIR/mixed_tokenizers.json"
# Kernel microbenchmarks, one file per op (bench/bench_<op>.py), one JSON per op
# ($OUTDIR/bench_<op>.json). The ops with targets (sample, grouped_linear) run in their own
# session, their target cases first (ids matching these substrings); the other six share one
# session (one interpreter start, one copy-bandwidth measurement, one budget) whose JSON is then
# split per file. Each session skips (not kills) its remaining cases when its budget is spent.
bench_step() {  # bench_step NAME SECONDS PRIORITY FILE...
  local name=$1 secs=$(budget "$2") prio=$3
  shift 3
  ME_BENCH_SECONDS=$secs ME_BENCH_PRIORITY="$prio" \
    step "$name" "$((secs + 13))" "$PY" -m pytest -q "$@" -p no:cacheprovider --benchmark-enable --benchmark-json="$OUTDIR/$name.json"
}
bench_step bench_sample 18 "top_p-B128-V131072-fp32|-B1-V|-B64-V|-B256-V" bench/bench_sample.py
bench_step bench_grouped_linear 18 "-M4-T1]|-M4-T16]|-M4-T512]|-M4-|-M3-" bench/bench_grouped_linear.py
OTHERS=(bench/bench_me_step.py bench/bench_mixture_sample.py bench/bench_mixture_logprobs.py bench/bench_select_members.py bench/bench_group_rows.py bench/bench_verify_draft.py)
bench_step ops-combined 18 "test_me_step[top_p-B1-V32000-|test_mixture_sample[top_p-B1-V152064-|test_mixture_logprobs[plain-B1-V152064-|test_select_members[B64-M3-|test_group_rows[T512-M3-|test_verify_draft[top_p-B1-J3-|test_me_step[top_p-B64-|test_mixture_sample[top_p-B64-|-B1-|-T1-" "${OTHERS[@]}"
"$PY" - "$OUTDIR/ops-combined.json" <<'PYEOF' && rm -f "$OUTDIR/ops-combined.json"
import json, os, sys
path = sys.argv[1]
data = json.load(open(path))
by_file = {}
for b in data.get("benchmarks", []):
    name = os.path.basename(b["fullname"].split("::")[0])[: -len(".py")]
    by_file.setdefault(name, []).append(b)
for name, benches in by_file.items():
    with open(os.path.join(os.path.dirname(path), name + ".json"), "w") as f:
        json.dump({**data, "benchmarks": benches}, f, indent=2)
print("split into", ", ".join(sorted(by_file)))
PYEOF
[ -f bench/plot.py ] && step plot 20 "$PY" bench/plot.py "$OUTDIR"
[ -f bench/summarize.py ] && "$PY" bench/summarize.py "$OUTDIR" | tee "$OUTDIR/summary.md"
echo
echo "steps:"
column -t -s $'\t' "$STATUS" 2>/dev/null || cat "$STATUS"
exit $failed
