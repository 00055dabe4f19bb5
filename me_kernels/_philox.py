"""Counter-based randomness in plain torch: Philox-4x32-10 and the stream layout.

The torch half of me_kernels._random (which holds the Triton half and explains the layout):
int64 arithmetic only, so the torch references (me_kernels.reference) draw bit-identical
numbers without Triton or the compiled extension. Stream ids separate the purposes, so the token
and the member drawn for the same (seed, offset) are independent:

    STREAM_TOKEN   = 0   sample() and the token of me_step()
    STREAM_MEMBER  = 1   select_members() and the member of me_step()
    STREAM_MIXTURE = 2   mixture_sample()
    STREAM_ACCEPT  = 3   verify_draft(): the acceptance uniform of a drafted token (element 0)
    STREAM_RESIDUAL = 4  verify_draft(): the draw from the residual max(0, p - q) after a rejection
"""
from __future__ import annotations

import torch

__all__ = [
    "STREAM_TOKEN",
    "STREAM_MEMBER",
    "STREAM_MIXTURE",
    "STREAM_ACCEPT",
    "STREAM_RESIDUAL",
    "philox4x32_10_torch",
    "philox_uniforms_torch",
    "gumbel_torch",
]

STREAM_TOKEN = 0
STREAM_MEMBER = 1
STREAM_MIXTURE = 2
STREAM_ACCEPT = 3
STREAM_RESIDUAL = 4

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# torch (int64 arithmetic; every value is kept in [0, 2**32))
# --------------------------------------------------------------------------------------------


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for a in [0, 2**32): 16-bit limbs keep every partial
    product below 2**49, so int64 never overflows."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo
    t = a * m_hi + (p_lo >> 16)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_10_torch(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on int64 tensors holding uint32 values (broadcasting). Returns 4 words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_uniforms_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """fp32 [B, n]: the uniforms of elements 0..n-1 for rows with int64 seed [B] / offset [B]
    (an offset of one element broadcasts), bit-identical to what the Triton kernels draw."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    offset = offset.to(torch.int64).reshape(-1, 1)
    device = seed.device
    n4 = (n + 3) // 4
    c0 = torch.arange(n4, dtype=torch.int64, device=device).reshape(1, -1)
    c1 = offset & _MASK32
    c2 = (offset >> 32) & _MASK32
    c3 = torch.full_like(c1, stream)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    words = philox4x32_10_torch(c0, c1, c2, c3, k0, k1)
    r = torch.stack(torch.broadcast_tensors(*words), dim=-1).reshape(seed.shape[0], 4 * n4)[:, :n]
    return ((r >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07


def gumbel_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int, uniforms=None) -> torch.Tensor:
    """fp32 [B, n] Gumbel(0, 1) noise, -log(-log(u)) of the uniforms.

    `uniforms(seed, offset, stream, n)` computes them (default `philox_uniforms_torch`); the CPU
    implementations of the registered ops pass the compiled helper, which draws the same words.
    """
    u = (uniforms or philox_uniforms_torch)(seed, offset, stream, n)
    return -torch.log(-torch.log(u))
