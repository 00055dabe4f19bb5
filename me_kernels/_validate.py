"""Host-side argument checks shared by the sampling, selection and mixture entry points.

Everything here is free on the host: shapes, dtypes, devices, Python scalars, and the values of
CPU tensors / Python lists. Values of CUDA tensors are never read here (that would synchronise
the device); the kernels map a row with an out-of-range device parameter or a bad device weight
row to -1 instead (see the docstrings of the public functions).

A row parameter is normalised to `RowParam(tensor, scalar)`: `tensor` is None for a Python scalar
(passed to the kernel as an argument, no device copy), or a 1-D view of length B on the logits'
device (a 0-dim tensor is expanded to stride 0).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .params import MIN_P, TEMPERATURE, TOP_K_MIN, TOP_P, FloatRange, check_float, check_int

__all__ = [
    "RowParam",
    "RowParams",
    "SAMPLING_ROW_NAMES",
    "SEED_ROW_NAMES",
    "SAMPLING_DTYPES",
    "MAX_VOCAB",
    "check_logits",
    "check_mixture_logits",
    "check_draft_inputs",
    "count_param",
    "sampling_params",
    "seed_param",
    "sampling_row_params",
    "seed_row_params",
    "check_weights",
    "check_batch",
]

SAMPLING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Counts are compared in fp32 inside the kernels (exact below 2**24).
MAX_VOCAB = 1 << 24
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64


class RowParam(NamedTuple):
    tensor: torch.Tensor | None  # [B] view (possibly stride 0) or None
    scalar: float | int  # used when tensor is None

    def value(self) -> torch.Tensor | float | int:
        """The tensor, or the scalar where there is none (what the torch references take)."""
        return self.tensor if self.tensor is not None else self.scalar

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """(pointer, row stride, scalar) as the Triton kernels take a row parameter; `dummy`
        stands in for the pointer of an absent tensor (never read: its HAS_* flag is False)."""
        if self.tensor is None:
            return dummy, 0, self.scalar
        return self.tensor, self.tensor.stride(0), self.scalar


# The per-row parameters in the order of the op schemas (me_kernels._ops.SCHEMAS), and the
# suffix of each one's HAS_* flag in the Triton kernels.
SAMPLING_ROW_NAMES = ("temperature", "top_k", "top_p", "min_p", "seed", "offset")
SEED_ROW_NAMES = ("seed", "offset")
_FLAG = {"temperature": "TEMP", "top_k": "TOPK", "top_p": "TOPP", "min_p": "MINP", "seed": "SEED", "offset": "OFF"}


class RowParams:
    """The per-row parameters of one call, by name, in schema order: the one place that turns
    them into op arguments, kernel arguments and reference keyword arguments."""

    def __init__(self, **params: RowParam):
        self.params = params

    @classmethod
    def from_flat(cls, names: tuple[str, ...], flat) -> "RowParams":
        """From the (tensor, scalar) pairs of an op call, in the order of `names`."""
        flat = tuple(flat)
        if len(flat) != 2 * len(names):
            raise TypeError(f"expected {2 * len(names)} row arguments ({', '.join(names)}), got {len(flat)}")
        return cls(**{n: RowParam(flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(names)})

    def __getitem__(self, name: str) -> RowParam:
        return self.params[name]

    def flat(self) -> tuple:
        """(tensor or None, scalar) pairs in order: the op schemas' row arguments."""
        return tuple(x for p in self.params.values() for x in p)

    def values(self) -> dict:
        """name -> tensor or scalar: keyword arguments of the torch references."""
        return {n: p.value() for n, p in self.params.items()}

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """(pointer, stride, scalar) triples in order: the Triton kernels' row arguments."""
        return tuple(x for p in self.params.values() for x in p.kernel_args(dummy))

    def has_flags(self) -> dict:
        """HAS_<NAME> constexpr flags of the Triton kernels: which parameters are tensors."""
        return {f"HAS_{_FLAG[n]}": p.tensor is not None for n, p in self.params.items()}


def _type_name(x) -> str:
    return type(x).__name__


def _check_tensor_arg(t, name: str, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(t)}")
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def _check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SAMPLING_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_logits(logits, name: str = "logits") -> tuple[int, int]:
    """logits [B, V] float32/bfloat16/float16 (any strides). Returns (B, V)."""
    _check_tensor_arg(logits, name, (2,))
    _check_float_dtype(logits, name)
    b, v = logits.shape
    if v < 1 or v >= MAX_VOCAB:
        raise ValueError(f"{name} must have a vocabulary size V in [1, {MAX_VOCAB}), got V={v}")
    return b, v


def check_mixture_logits(logits, name: str = "logits") -> tuple[int, int, int]:
    """logits [M, B, V] float32/bfloat16/float16 (any strides). Returns (M, B, V)."""
    _check_tensor_arg(logits, name, (3,))
    _check_float_dtype(logits, name)
    m, b, v = logits.shape
    if m < 1:
        raise ValueError(f"{name} must hold at least one member (shape [M, B, V] with M >= 1), got M={m}")
    if v < 1 or v >= MAX_VOCAB:
        raise ValueError(f"{name} must have a vocabulary size V in [1, {MAX_VOCAB}), got V={v}")
    return m, b, v


def check_draft_inputs(target_logits, draft_logits, draft_tokens) -> tuple[int, int, int, int]:
    """The inputs of verify_draft: target_logits [M, B, J, V] and draft_logits [B, J, V]
    float32/bfloat16/float16 (any strides, dtypes may differ), draft_tokens integer [B, J], all
    on one device. Returns (M, B, J, V)."""
    _check_tensor_arg(target_logits, "target_logits", (4,))
    _check_float_dtype(target_logits, "target_logits")
    m, b, j, v = target_logits.shape
    if m < 1:
        raise ValueError(f"target_logits must hold at least one member (shape [M, B, J, V] with M >= 1), got M={m}")
    if v < 1 or v >= MAX_VOCAB:
        raise ValueError(f"target_logits must have a vocabulary size V in [1, {MAX_VOCAB}), got V={v}")
    _check_tensor_arg(draft_logits, "draft_logits", (3,))
    _check_float_dtype(draft_logits, "draft_logits")
    if tuple(draft_logits.shape) != (b, j, v):
        raise ValueError(f"draft_logits must have shape [B, J, V] = [{b}, {j}, {v}] (as target_logits [M, B, J, V]), "
                         f"got {tuple(draft_logits.shape)}")
    _check_tensor_arg(draft_tokens, "draft_tokens", (2,))
    if draft_tokens.dtype == torch.bool or draft_tokens.is_floating_point() or draft_tokens.is_complex():
        raise TypeError(f"draft_tokens must be an integer tensor, got {draft_tokens.dtype}")
    if tuple(draft_tokens.shape) != (b, j):
        raise ValueError(f"draft_tokens must have shape [B, J] = [{b}, {j}], got {tuple(draft_tokens.shape)}")
    device = target_logits.device
    for name, t in (("draft_logits", draft_logits), ("draft_tokens", draft_tokens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but target_logits is on {device}")
    return m, b, j, v


def count_param(value, name: str, batch: int, device: torch.device, hi: int) -> RowParam:
    """A per-row count in [0, hi]: None (= hi for every row), a Python int, or an integer tensor
    [B] (int64; CPU values are range-checked, device values are clamped by the kernels)."""
    if value is None:
        return RowParam(None, hi)
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        t = _row_tensor(value, name, batch, device)
        if _values_readable(t) and t.numel() > 0:
            bad = (t < 0) | (t > hi)
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] = {int(t[row])} is outside the allowed range [0, {hi}]")
        return RowParam(t.to(torch.int64), hi)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be None, an int or an integer tensor of shape [B], got {_type_name(value)}")
    if not 0 <= int(value) <= hi:
        raise ValueError(f"{name} = {int(value)} is outside the allowed range [0, {hi}]")
    return RowParam(None, int(value))


def check_batch(batch, name: str = "batch") -> int:
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(batch)}")
    if batch < 0:
        raise ValueError(f"{name} must be >= 0, got {batch}")
    return int(batch)


def _row_tensor(t: torch.Tensor, name: str, batch: int, device: torch.device) -> torch.Tensor:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    if t.dim() == 0:
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a scalar or a tensor of shape [B] = [{batch}], got shape {tuple(t.shape)}")
    return t


def _values_readable(t: torch.Tensor) -> bool:
    """Whether argument values are checked on the host: for CPU tensors (reading them costs no
    device sync), except while torch.compile traces a call (a value-dependent branch would break
    the graph; the kernels then treat bad rows as on CUDA: they yield -1)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _float_param(value, rule: FloatRange, batch, device) -> RowParam:
    """Float row parameter in `rule`'s range: a Python real (me_kernels.params' rule) or a float
    tensor [B] (the same range, checked on the values of CPU tensors)."""
    name = rule.name
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        t = _row_tensor(value, name, batch, device)
        if _values_readable(t) and t.numel() > 0:
            lo_ok = (t > rule.lo) if rule.lo_open else (t >= rule.lo)
            hi_ok = (t < rule.hi) if rule.hi_open else (t <= rule.hi)
            bad = torch.isnan(t) | ~lo_ok | ~hi_ok
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] = {float(t[row])} is outside the allowed range {rule.text()}")
        return RowParam(t.to(torch.float32), 0.0)
    return RowParam(None, check_float(rule, value))


def _int_param(value, name, batch, device, lo) -> RowParam:
    """Integer row parameter >= lo. Tensors: any integer dtype."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        t = _row_tensor(value, name, batch, device)
        if _values_readable(t) and t.numel() > 0:
            bad = t < lo
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] = {int(t[row])} is outside the allowed range [{lo}, inf)")
        return RowParam(t, 0)
    return RowParam(None, check_int(value, name, lo))


def sampling_params(batch: int, device: torch.device, temperature, top_k, top_p, min_p):
    """Checks and normalises (temperature, top_k, top_p, min_p) with the rules of
    me_kernels.params (the same as SamplingParams): temperature in [0, inf] (0 = greedy, inf =
    uniform over the kept set); top_k >= 0 (0 = off); top_p in (0, 1] (1 = off); min_p in [0, 1]
    (0 = off); NaN nowhere.
    Returns RowParams; top_k's tensor is int32 (values above 2**31 - 1 are clamped, which keeps
    every token, exactly as any k >= V does).
    """
    temp = _float_param(temperature, TEMPERATURE, batch, device)
    k = _int_param(top_k, "top_k", batch, device, TOP_K_MIN)
    if k.tensor is not None:
        k = RowParam(k.tensor.clamp(max=(1 << 31) - 1).to(torch.int32), 0)
    else:
        k = RowParam(None, min(k.scalar, (1 << 31) - 1))
    p = _float_param(top_p, TOP_P, batch, device)
    mp = _float_param(min_p, MIN_P, batch, device)
    return temp, k, p, mp


def seed_param(value, name: str, batch: int, device: torch.device) -> RowParam:
    """seed / offset: a Python int (64-bit, taken modulo 2**64, stored as signed int64) or an
    integer tensor of shape [B] (converted to int64). The same value is used for every row when
    a Python int is given."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int64 tensor, got {value.dtype}")
        return RowParam(_row_tensor(value, name, batch, device).to(torch.int64), 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or an int64 tensor of shape [B], got {_type_name(value)}")
    v = int(value)
    if not _INT64_MIN <= v < _UINT64_END:
        raise ValueError(f"{name} must be a 64-bit integer in [-2**63, 2**64), got {v}")
    if v >= 1 << 63:
        v -= 1 << 64
    return RowParam(None, v)


def sampling_row_params(batch: int, device: torch.device, *, temperature, top_k, top_p, min_p, seed,
                        offset) -> RowParams:
    """Checks and normalises the six per-row parameters of sample / me_step / mixture_sample."""
    temp, k, p, mp = sampling_params(batch, device, temperature, top_k, top_p, min_p)
    return RowParams(temperature=temp, top_k=k, top_p=p, min_p=mp, seed=seed_param(seed, "seed", batch, device),
                     offset=seed_param(offset, "offset", batch, device))


def seed_row_params(batch: int, device: torch.device, *, seed, offset) -> RowParams:
    """Checks and normalises the per-row seed / offset of select_members."""
    return RowParams(seed=seed_param(seed, "seed", batch, device), offset=seed_param(offset, "offset", batch, device))


def check_weights(weights, name: str, device: torch.device, num_members: int | None = None,
                  batch: int | None = None) -> torch.Tensor:
    """weights [M] or [B, M] (a tensor, or a list/tuple of numbers for [M]).

    Host-known values (CPU tensor, list) must be finite, non-negative and not all zero per row;
    CUDA tensors are not read (a bad device row yields -1 in the kernels). Returns a float32
    tensor on `device` ([M] or [B, M], strides kept). Host weights are copied to the device on
    every call, which cannot happen inside a CUDA-graph capture: pass device weights there.
    """
    if isinstance(weights, (list, tuple)):
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in weights):
            raise TypeError(f"{name} must be a tensor or a list of numbers")
        weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [M] or [B, M], got {_type_name(weights)}")
    if not weights.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weights.dtype}")
    if weights.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [M] or [B, M], got {tuple(weights.shape)}")
    m = weights.shape[-1]
    if m < 1:
        raise ValueError(f"{name} must hold at least one member weight, got shape {tuple(weights.shape)}")
    if num_members is not None and m != num_members:
        raise ValueError(f"{name} has {m} member weights but there are {num_members} members")
    if weights.dim() == 2 and batch is not None and weights.shape[0] != batch:
        raise ValueError(f"{name} has {weights.shape[0]} rows but the batch has B={batch}")
    if _values_readable(weights):
        w = weights.to(torch.float64)
        rows = w.reshape(-1, m)
        if bool(torch.isnan(rows).any()):
            raise ValueError(f"{name} must not contain NaN")
        if bool(torch.isinf(rows).any()):
            raise ValueError(f"{name} must be finite")
        if bool((rows < 0).any()):
            raise ValueError(f"{name} must be non-negative, got {rows[(rows < 0).any(1)][0].tolist()}")
        if rows.shape[0] > 0 and bool((rows.sum(1) <= 0).any()):
            row = int((rows.sum(1) <= 0).nonzero()[0, 0])
            raise ValueError(f"{name} row {row} is all zero: at least one weight must be positive")
    if weights.device != device:
        if weights.device.type == "cpu":
            weights = weights.to(device)  # host-known weights, already checked
        else:
            raise ValueError(f"{name} is on {weights.device} but the inputs are on {device}")
    return weights.to(torch.float32)
