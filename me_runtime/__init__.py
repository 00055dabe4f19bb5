"""me_runtime: a thin runtime that ensembles Hugging Face causal LMs with me_kernels."""
