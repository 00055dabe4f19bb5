#!/usr/bin/env bash
# Compile-checks the CUDA side of the extension on a machine without a GPU:
#   * every csrc/**/*.cu with nvcc for sm_90a (and sm_80), compile only (the .cu files are
#     torch-free: kernels + launchers, see csrc/launchers.h);
#   * the CUDA dispatch layer (csrc/cuda/*.cpp) and bindings.cpp with ME_WITH_CUDA defined,
#     syntax-checked against the installed torch's headers (its CPU wheel ships c10/cuda).
# Fails on any error. Usage: .ci/check_cuda_sources.sh [ARCH_GENCODE...]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "check_cuda_sources: nvcc not found (set NVCC or CUDA_HOME); CUDA sources must compile before landing" >&2
  exit 1
fi
# Ask nvcc where its headers are (it may be a wrapper script outside the toolkit's tree).
CUDA_INC_FLAGS=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES=//p; s/^#\$ SYSTEM_INCLUDES=//p' | tr -d '"' | tr '\n' ' ')
GENCODE=("$@")
[ ${#GENCODE[@]} -eq 0 ] && GENCODE=(-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda_sources: $("$NVCC" --version | tail -n 2 | head -n 1)"
n=0
while IFS= read -r cu; do
  echo "  nvcc ${GENCODE[*]} -c $cu"
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xptxas -warn-spills -Icsrc "${GENCODE[@]}" \
    -c "$cu" -o "$OUT/$(basename "$cu").o"
  n=$((n + 1))
done < <(find csrc -name '*.cu' | sort)
echo "check_cuda_sources: $n CUDA source(s) compiled for sm_90a"
PY=${PYTHON:-python3}
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# The CPU wheel lacks one generated header of c10/cuda; stand in for it as a CUDA build has it.
mkdir -p "$OUT/shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
for cpp in csrc/cuda/*.cpp csrc/bindings.cpp; do
  [ -f "$cpp" ] || continue
  echo "  g++ -fsyntax-only -DME_WITH_CUDA $cpp"
  g++ -std=c++20 -fsyntax-only -w -DME_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc $TORCH_INC -I"$OUT/shim" $CUDA_INC_FLAGS -I"$PY_INC" "$cpp"
done
echo "check_cuda_sources: CUDA dispatch layer compiles (syntax) against torch $("$PY" -c 'import torch; print(torch.__version__)')"
