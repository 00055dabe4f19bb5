"""me_runtime: a thin runtime that ensembles Hugging Face causal LMs with me_kernels.

    from me_runtime import Ensemble
    ens = Ensemble.from_pretrained([path_a, path_b], weights=[0.5, 0.5])
    ens.generate(["Once upon a time"], method="me", max_new_tokens=32, seed=0)
"""
from .ensemble import Ensemble, Generation

__all__ = ["Ensemble", "Generation", "demo_members"]


def __getattr__(name: str):
    # The demo members are package data with their own module: import it only when asked for,
    # so that `import me_runtime` stays the runtime alone.
    if name == "demo_members":
        from .demo import demo_members

        return demo_members
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
