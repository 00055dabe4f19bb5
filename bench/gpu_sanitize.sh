#!/usr/bin/env bash
# compute-sanitizer (memcheck, then racecheck) over the GPU tests of every CUDA and Triton kernel,
# for a GPU machine (run after bench/gpu_suite.sh has built me_kernels._C in place, or it builds
# it). One command that fits in about 5 minutes; writes OUTDIR/sanitize_<tool>.log and
# OUTDIR/sanitize.tsv (tool, status, seconds). Usage: bench/gpu_sanitize.sh OUTDIR
#   PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own cudaMalloc, so an access past a tensor's
#   end is outside any allocation and memcheck reports it (with the caching allocator it would
#   land in a neighbour's block and pass unseen).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_sanitize.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$SAN" >/dev/null || SAN=/usr/local/cuda/bin/compute-sanitizer
"$PY" -c "import me_kernels; assert me_kernels.EXTENSION_LOADED" 2>/dev/null || \
  timeout 200 "$PY" setup.py build_ext --inplace >"$OUTDIR/sanitize_build.log" 2>&1
# The kernel tests' GPU cases (small shapes; the long statistical ones deselected).
TESTS=(tests/test_sample.py tests/test_me_step.py tests/test_select_members.py tests/test_mixture_sample.py
       tests/test_mixture_logprobs.py tests/test_grouped_linear.py tests/test_group_rows.py tests/test_verify_draft.py)
SELECT="not statistic and not chi and not follows and not large"
: >"$OUTDIR/sanitize.tsv"
status=0
for tool in memcheck racecheck; do
  t0=$SECONDS
  limit=$([ "$tool" = memcheck ] && echo 170 || echo 110)
  timeout --signal=INT --kill-after=15 "$limit" "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -k "$SELECT" "${TESTS[@]}" >"$OUTDIR/sanitize_$tool.log" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR/sanitize_$tool.log" | tail -n 1)
  printf '%s\t%s\t%ss\t%s\n' "$tool" "$([ $rc -eq 0 ] && echo ok || echo "rc=$rc")" "$((SECONDS - t0))" "$summary" \
    | tee -a "$OUTDIR/sanitize.tsv"
  [ $rc -eq 0 ] || status=1
done
exit $status
