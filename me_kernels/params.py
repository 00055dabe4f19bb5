"""Sampling parameters: one rule per argument, shared by every entry point.

`SamplingParams` checks Python scalars on construction with exactly the rules the kernels apply to
their scalar arguments (me_kernels._validate calls the same `check_*` functions, and applies the
same ranges to the values of CPU tensors):

    temperature  float in [0, inf]   0 = greedy (lowest index on ties); inf = the limit, uniform
                                     over the kept set (accepted everywhere)
    top_k        int >= 0            0 = off; values above 2**31 - 1 keep every token
    top_p        float in (0, 1]     1 = off
    min_p        float in [0, 1]     0 = off

NaN is rejected everywhere. A wrong type raises TypeError, a value out of range ValueError, both
naming the argument and its allowed range.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["SamplingParams", "FloatRange", "TEMPERATURE", "TOP_P", "MIN_P", "TOP_K_MIN", "check_float", "check_int",
           "check_temperature", "check_top_k",
           "check_top_p", "check_min_p"]


class FloatRange(NamedTuple):
    """The allowed range of a float argument (NaN is never in it)."""

    name: str
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    def text(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def contains(self, x: float) -> bool:
        if math.isnan(x):
            return False
        ok_lo = x > self.lo if self.lo_open else x >= self.lo
        ok_hi = x < self.hi if self.hi_open else x <= self.hi
        return ok_lo and ok_hi


TEMPERATURE = FloatRange("temperature", 0.0, math.inf, False, False)
TOP_P = FloatRange("top_p", 0.0, 1.0, True, False)
MIN_P = FloatRange("min_p", 0.0, 1.0, False, False)
TOP_K_MIN = 0


def check_float(rule: FloatRange, value: float, name: str | None = None) -> float:
    """A Python real in `rule`'s range -> float (TypeError / ValueError otherwise).

    Example::

        >>> check_float(TOP_P, 0.9)
        0.9
    """
    name = name or rule.name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor of shape [B], got {type(value).__name__}")
    x = float(value)
    if not rule.contains(x):
        raise ValueError(f"{name} must be in {rule.text()}, got {value}")
    return x


def check_int(value: int, name: str, lo: int) -> int:
    """A Python integer >= lo -> int (TypeError / ValueError otherwise).

    Example::

        >>> check_int(50, "top_k", 0)
        50
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or an integer tensor of shape [B], got {type(value).__name__}")
    v = int(value)
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def check_temperature(value: float) -> float:
    """temperature: float in [0, inf] (0 = greedy, inf = uniform over the kept set).

    Example::

        >>> check_temperature(0.7)
        0.7
    """
    return check_float(TEMPERATURE, value)


def check_top_k(value: int) -> int:
    """top_k: int >= 0 (0 = off).

    Example::

        >>> check_top_k(0)
        0
    """
    return check_int(value, "top_k", TOP_K_MIN)


def check_top_p(value: float) -> float:
    """top_p: float in (0, 1] (1 = off).

    Example::

        >>> check_top_p(1.0)
        1.0
    """
    return check_float(TOP_P, value)


def check_min_p(value: float) -> float:
    """min_p: float in [0, 1] (0 = off).

    Example::

        >>> check_min_p(0.05)
        0.05
    """
    return check_float(MIN_P, value)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters (Python scalars), in Hugging Face's order of application.

    Construction checks every field with the kernels' rules (module docstring) and stores it
    normalised (floats as float, top_k as int).

    Example::

        >>> params = SamplingParams(temperature=0.7, top_p=0.9)
        >>> me_kernels.sample(logits, seed=seeds, **params.kwargs())
        >>> SamplingParams(top_p=0.0)   # ValueError: top_p must be in (0, 1], got 0.0
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        # frozen: the normalised values are stored through object.__setattr__
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        object.__setattr__(self, "top_k", check_top_k(self.top_k))
        object.__setattr__(self, "top_p", check_top_p(self.top_p))
        object.__setattr__(self, "min_p", check_min_p(self.min_p))

    def kwargs(self) -> dict:
        """{"temperature": ..., "top_k": ..., "top_p": ..., "min_p": ...}: keyword arguments of
        sample / me_step / mixture_sample."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}
