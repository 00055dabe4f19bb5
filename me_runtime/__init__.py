"""me_runtime: a thin runtime that ensembles Hugging Face causal LMs with me_kernels.

    from me_runtime import Ensemble
    ens = Ensemble.from_pretrained([path_a, path_b], weights=[0.5, 0.5])
    ens.generate(["Once upon a time"], method="me", max_new_tokens=32, seed=0)
"""
from .demo import demo_members
from .ensemble import Ensemble, Generation

__all__ = ["Ensemble", "Generation", "demo_members"]
