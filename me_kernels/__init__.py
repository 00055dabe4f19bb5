"""me_kernels: device kernels for mixture-model-like LLM ensembles.

Sampling, member selection and mixture kernels (Triton), the compiled grouped ops
(torch.ops.me.*, from me_kernels._C), and their torch references in me_kernels.reference.
CUDA tensors run the kernels; CPU tensors run the Triton interpreter when TRITON_INTERPRET=1,
else the torch reference path.
"""
from . import reference
from ._ops import EXTENSION_LOADED
from .grouped import group_rows, grouped_linear

__all__ = ["EXTENSION_LOADED", "group_rows", "grouped_linear", "reference"]
__version__ = "0.1.0"
