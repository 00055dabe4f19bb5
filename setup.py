"""Build script for me-ensemble: the me_kernels / me_runtime packages and the compiled
extension me_kernels._C.

    pip install --no-build-isolation .        # or -e . for development

The extension is built against the torch that is already installed:
  * CUDA build when that torch has CUDA and nvcc is found (CUDA_HOME). Architectures come
    from ME_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else "8.0;9.0a" (sm_80 + sm_90a).
  * CPU build otherwise: the same op names with CPU implementations.
  * ME_SKIP_EXT=1: no extension at all; the package imports and falls back to torch.
  * ME_FORCE_CPU_EXT=1: CPU build even when CUDA is available (CI, debugging).
Nothing here queries a GPU: the CUDA build is decided by the toolchain, not the hardware.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_gencode_flags(arch_list):
    """'8.0;9.0a' -> nvcc -gencode flags. Uses the -gencode form for 'a' targets because the
    -arch=sm_90a shorthand also runs a plain sm_90 pass that rejects wgmma on nvcc 13.0."""
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"ME_CUDA_ARCH_LIST / TORCH_CUDA_ARCH_LIST gave no architectures: {arch_list!r}")
    return flags


def _bounded_jobs(per_job_gib):
    """Parallel compile jobs bounded by cores and by memory (nvcc on big templates needs GiBs)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_memory = max(1, int(avail_kib / (1024 * 1024) / per_job_gib))
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def extension_modules():
    if _env_flag("ME_SKIP_EXT"):
        print("me-ensemble: ME_SKIP_EXT=1, not building me_kernels._C (torch fallbacks will be used)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "me-ensemble: building me_kernels._C needs torch installed first, and pip's build "
            "isolation hides it. Run: pip install torch && pip install --no-build-isolation . "
            "(or set ME_SKIP_EXT=1 to install without the compiled extension)."
        )

    arch_list = None
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and not _env_flag("ME_FORCE_CPU_EXT")
    )
    # Common sources (bindings, CPU kernels) are C++; CUDA launchers (.cu) and the CUDA dispatch
    # layer (csrc/cuda/*.cpp) only join in a CUDA build.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch adds the standard its headers need (c++17 or c++20 by version).
    # -ffp-contract=off: the CPU sampling kernels must round every fp32 operation like the torch
    # reference (an FMA would change the scores in the last bit on targets that have one).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("ME_WITH_CUDA", "1"))
        arch_list = os.environ.get("ME_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        # Explicit -gencode flags: torch then adds none of its own (it would otherwise read the
        # visible GPU, which a build must never query).
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += _cuda_gencode_flags(arch_list)
        ext = CUDAExtension(
            name="me_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        per_job_gib = 3.0
    else:
        ext = CppExtension(
            name="me_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
        per_job_gib = 1.5
    os.environ.setdefault("MAX_JOBS", str(_bounded_jobs(per_job_gib)))
    print(
        f"me-ensemble: building me_kernels._C ({'CUDA ' + arch_list if with_cuda else 'CPU'}),"
        f" MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="me-ensemble",
    version="0.1.0",
    description="GPU kernels and runtime for fast LLM ensembling (mixture-model-like ensembles)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the two libraries: scripts/ (how the demo members were made), tests/ and bench/ stay
    # in the repository.
    packages=find_packages(include=["me_kernels", "me_kernels.*", "me_runtime", "me_runtime.*"]),
    include_package_data=True,
    # What running the shipped demo members needs: their folders, the held-out excerpts the CLI
    # scores, and the notes on their sources and evaluation.
    package_data={"me_runtime": ["demo/members/*/*", "demo/heldout.json", "demo/*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is not pinned: the extension is built against whatever torch is installed, and on a
    # CPU machine an unpinned requirement would otherwise never pull a CUDA build (2.x is satisfied).
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scipy", "hypothesis>=6.100"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # me_runtime.harness / me-eval: evaluate ensembles with lm-evaluation-harness
        "eval": ["lm-eval>=0.4.8"],
        # from_pretrained(..., placement="ray"): members in Ray actors (me_runtime/ray_placement.py)
        "ray": ["ray>=2.9"],
        # from_pretrained(..., device="auto"): a member sharded over several GPUs (accelerate's device maps)
        "multigpu": ["accelerate>=0.26"],
    },
    entry_points={"console_scripts": ["me-generate=me_runtime.cli:main", "me-eval=me_runtime.harness:main"]},
    zip_safe=False,
)
