"""The `torch.ops.me` operators: their schemas (this is the one place they are written), who
defines them, and their CPU and fake implementations.

Who implements what:
  * The compiled extension me_kernels._C, when it is built, defines operators itself (today
    group_rows, grouped_linear and the CPU Philox helper philox_uniforms; it may add CPU kernels
    of the sampling ops under the schemas below). An operator it defines is never redefined
    here: Python only adds what is missing (the CUDA Triton launchers, a fake implementation,
    and a CPU implementation if the extension gave none).
  * An operator the extension does not define is defined here, with its torch reference as the
    CPU implementation (group_rows / grouped_linear: a composite fallback for every device that
    warns once, as their CUDA kernels live in the extension too).
  * The CUDA implementations of the sampling ops are the Triton launchers; each kernel module
    registers its own with `register_cuda` when it is imported.
  * Fake implementations make every op traceable by torch.compile.
"""
from __future__ import annotations

import torch

from . import reference
from ._extension import EXTENSION_LOADED, op_is_defined, warn_fallback_once
from ._philox import philox_uniforms_torch
from ._validate import SAMPLING_ROW_NAMES, SEED_ROW_NAMES, RowParams

__all__ = ["SCHEMAS", "register_cuda", "uniforms_torch"]

# The per-row parameters travel as (tensor or None, scalar) pairs: float32 [B] temperature /
# top_p / min_p, int32 [B] top_k, int64 [B] seed / offset (possibly stride-0 expanded); the
# scalar is used where the tensor is None. The C++ CPU kernels use these exact strings.
_ROW = ("Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, float topp_s, "
        "Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s")
SCHEMAS = {
    "group_rows": "group_rows(Tensor members, int num_members) -> (Tensor order, Tensor offsets)",
    "grouped_linear": "grouped_linear(Tensor x, Tensor members, Tensor weight, Tensor? bias=None) -> Tensor",
    "sample": f"sample(Tensor logits, {_ROW}) -> Tensor",
    "me_step": f"me_step(Tensor logits, Tensor weights, {_ROW}, bool shared) -> (Tensor, Tensor)",
    "select_members": "select_members(Tensor weights, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s, int batch) -> Tensor",
    "mixture_sample": f"mixture_sample(Tensor logits, Tensor weights, {_ROW}) -> Tensor",
    "mixture_logprobs": "mixture_logprobs(Tensor logits, Tensor weights) -> Tensor",
    # num_drafts travels like a row parameter: int64 [B] tensor, or the scalar for every row.
    "verify_draft": ("verify_draft(Tensor target_logits, Tensor draft_logits, Tensor draft_tokens, Tensor weights, "
                     f"Tensor? ndraft_t, int ndraft_s, {_ROW}) -> (Tensor, Tensor)"),
}

_lib = torch.library.Library("me", "FRAGMENT")  # kept alive: the registrations live as long as it


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"me::{name}", key)


def uniforms_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """fp32 [B, n], the Philox uniforms of me_kernels._philox.philox_uniforms_torch. On the CPU
    the compiled helper torch.ops.me.philox_uniforms computes the same words in one pass (a whole
    vocabulary per decode step: milliseconds as ~200 tensor ops, tens of microseconds in C++)."""
    if seed.device.type == "cpu" and EXTENSION_LOADED:
        seed = seed.to(torch.int64).reshape(-1)
        offset = offset.to(torch.int64).reshape(-1).expand(seed.shape[0]).contiguous()
        return torch.ops.me.philox_uniforms(seed.contiguous(), offset, stream, n)
    return philox_uniforms_torch(seed, offset, stream, n)


# --------------------------------------------------------------------------------------------
# CPU implementations: the torch references (used when the extension has no CPU kernel)
# --------------------------------------------------------------------------------------------


def _check_cpu_ids(members, num_members, op):
    # Like the compiled CPU op: reading a CPU tensor costs no sync, so bad ids raise. (On CUDA
    # nothing is checked on the host; such rows come out last / as NaN.)
    if members.device.type == "cpu" and members.numel():
        bad = (members < 0) | (members >= num_members)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: members[{t}] = {int(members[t])} is outside [0, num_members={num_members})")


def _check_group_rows_args(members, num_members):
    # The argument rules of the compiled op (csrc/checks.h), so both paths reject alike.
    if members.dtype != torch.int32:
        raise TypeError(f"group_rows: members must be int32, got {members.dtype}")
    if members.dim() != 1:
        raise ValueError(f"group_rows: members must be 1-D [T], got shape {list(members.shape)}")
    if num_members < 1:
        raise ValueError(f"group_rows: num_members must be >= 1, got {num_members}")


def _group_rows_fallback(members, num_members):
    warn_fallback_once()
    _check_group_rows_args(members, num_members)
    _check_cpu_ids(members, num_members, "group_rows")
    return reference.group_rows_reference(members, num_members)


def _check_grouped_linear_args(x, members, weight, bias):
    # The argument rules of the compiled op (csrc/checks.h), so both paths reject alike.
    op = "grouped_linear"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [T, K], got shape {list(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"{op}: weight must be 3-D [M, N, K], got shape {list(weight.shape)}")
    if members.dim() != 1:
        raise ValueError(f"{op}: members must be 1-D [T], got shape {list(members.shape)}")
    if members.dtype != torch.int32:
        raise TypeError(f"{op}: members must be int32, got {members.dtype}")
    if members.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: members has {members.shape[0]} rows but x has {x.shape[0]}")
    if weight.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: x has K={x.shape[1]} but weight [M, N, K] has K={weight.shape[2]}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must hold at least one member")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if not x.device == weight.device == members.device:
        raise ValueError(f"{op}: x, members and weight must be on one device, got {x.device}, {members.device}, "
                         f"{weight.device}")
    if bias is not None:
        if bias.dim() != 2 or tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ValueError(f"{op}: bias must be [M, N] = [{weight.shape[0]}, {weight.shape[1]}], got shape "
                             f"{list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _grouped_linear_fallback(x, members, weight, bias=None):
    warn_fallback_once()
    _check_grouped_linear_args(x, members, weight, bias)
    _check_cpu_ids(members, weight.shape[0], "grouped_linear")
    return reference.grouped_linear_reference(x, members, weight, bias)


def _sample_cpu(logits, *row):
    kwargs = RowParams.from_flat(SAMPLING_ROW_NAMES, row).values()
    return reference.sample_reference(logits, **kwargs, uniforms=uniforms_torch)


def _me_step_cpu(logits, weights, *row_and_shared):
    *row, shared = row_and_shared
    kwargs = RowParams.from_flat(SAMPLING_ROW_NAMES, row).values()
    return reference.me_step_reference(logits, weights, **kwargs, shared=shared, uniforms=uniforms_torch)


def _select_members_cpu(weights, seed_t, seed_s, off_t, off_s, batch):
    kwargs = RowParams.from_flat(SEED_ROW_NAMES, (seed_t, seed_s, off_t, off_s)).values()
    return reference.select_members_reference(weights, **kwargs, batch=batch, uniforms=uniforms_torch)


def _mixture_sample_cpu(logits, weights, *row):
    kwargs = RowParams.from_flat(SAMPLING_ROW_NAMES, row).values()
    return reference.mixture_sample_reference(logits, weights, **kwargs, uniforms=uniforms_torch)


def _verify_draft_cpu(target_logits, draft_logits, draft_tokens, weights, ndraft_t, ndraft_s, *row):
    kwargs = RowParams.from_flat(SAMPLING_ROW_NAMES, row).values()
    num_drafts = ndraft_t if ndraft_t is not None else ndraft_s
    return reference.verify_draft_reference(target_logits, draft_logits, draft_tokens, weights, num_drafts=num_drafts,
                                            **kwargs, uniforms=uniforms_torch)


_FALLBACKS = {  # name -> (implementation, dispatch key)
    "group_rows": (_group_rows_fallback, "CompositeExplicitAutograd"),
    "grouped_linear": (_grouped_linear_fallback, "CompositeExplicitAutograd"),
    "sample": (_sample_cpu, "CPU"),
    "me_step": (_me_step_cpu, "CPU"),
    "select_members": (_select_members_cpu, "CPU"),
    "mixture_sample": (_mixture_sample_cpu, "CPU"),
    "mixture_logprobs": (reference.mixture_logprobs_reference, "CPU"),
    "verify_draft": (_verify_draft_cpu, "CPU"),
}

for _name, (_impl, _key) in _FALLBACKS.items():
    if not op_is_defined(_name):
        _lib.define(SCHEMAS[_name])
        _lib.impl(_name, _impl, _key)
    elif _key == "CPU" and not (_has_kernel(_name, "CPU") or _has_kernel(_name, "CompositeExplicitAutograd")):
        _lib.impl(_name, _impl, "CPU")  # the extension declared the op without a CPU kernel


def register_cuda(name: str, impl) -> None:
    """Registers `impl` (a Triton launcher with the op's schema) as the CUDA implementation of
    me::<name>, unless the extension already provides one."""
    if not _has_kernel(name, "CUDA"):
        _lib.impl(name, impl, "CUDA")


# --------------------------------------------------------------------------------------------
# Fake implementations (shapes and dtypes only), for torch.compile
# --------------------------------------------------------------------------------------------


def _group_rows_fake(members, num_members):
    return members.new_empty(members.shape), members.new_empty((num_members + 1,))


def _grouped_linear_fake(x, members, weight, bias=None):
    return x.new_empty((x.shape[0], weight.shape[1]))


def _sample_fake(logits, *row):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def _me_step_fake(logits, weights, *row_and_shared):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b,), dtype=torch.int32)


def _select_members_fake(weights, seed_t, seed_s, off_t, off_s, batch):
    return weights.new_empty((batch,), dtype=torch.int32)


def _mixture_sample_fake(logits, weights, *row):
    return logits.new_empty((logits.shape[1],), dtype=torch.int64)


def _mixture_logprobs_fake(logits, weights):
    return logits.new_empty((logits.shape[1], logits.shape[2]), dtype=torch.float32)


def _verify_draft_fake(target_logits, draft_logits, draft_tokens, weights, ndraft_t, ndraft_s, *row):
    b = target_logits.shape[1]
    return target_logits.new_empty((b,), dtype=torch.int64), target_logits.new_empty((b,), dtype=torch.int64)


_FAKES = {
    "group_rows": _group_rows_fake,
    "grouped_linear": _grouped_linear_fake,
    "sample": _sample_fake,
    "me_step": _me_step_fake,
    "select_members": _select_members_fake,
    "mixture_sample": _mixture_sample_fake,
    "mixture_logprobs": _mixture_logprobs_fake,
    "verify_draft": _verify_draft_fake,
}
for _name, _fake in _FAKES.items():
    if not _has_kernel(_name, "Meta"):  # an extension's own meta kernel is kept
        torch.library.register_fake(f"me::{_name}", _fake, lib=_lib)
