"""Counter-based randomness shared by the Triton kernels and the torch references.

Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), written
twice: once in Triton (`philox4x32_10`, `tl.umulhi`) and once in plain torch int64 arithmetic
(`philox4x32_10_torch`). Both produce the same 32-bit words, checked against the Random123
known-answer vectors in the tests, so a kernel and its reference draw bit-identical uniforms.

Stream layout (what each Philox counter / key word holds)::

    key     = (seed[b] & 0xffffffff, seed[b] >> 32)          the row's 64-bit seed
    counter = (i >> 2, offset[b] & 0xffffffff, offset[b] >> 32, stream)
    word    = i & 3                                          one of the 4 output words

`i` is the element the number belongs to: the vocabulary index for a token draw, the member
index for a member draw. `stream` separates the purposes, so the token and the member drawn
for the same (seed, offset) are independent:

    STREAM_TOKEN   = 0   sample() and the token of me_step()
    STREAM_MEMBER  = 1   select_members() and the member of me_step()
    STREAM_MIXTURE = 2   mixture_sample()

Nothing depends on the row's position in the batch or on the batch size. One Philox call
yields the numbers of 4 consecutive elements (the 4 output words), which divides the integer
work of a full-vocabulary draw by 4.

A 32-bit word r becomes the uniform u = ((r >> 9) + 0.5) * 2**-23, exactly representable in
fp32 and strictly inside (0, 1), so the Gumbel noise -log(-log(u)) is always finite.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import on_device

__all__ = [
    "STREAM_TOKEN",
    "STREAM_MEMBER",
    "STREAM_MIXTURE",
    "philox4x32_10",
    "philox4x32_10_torch",
    "uniform_from_bits",
    "gumbel_tile",
    "gumbel_at",
    "uniforms_torch",
    "philox_uniforms_torch",
    "gumbel_torch",
    "uniforms_triton",
]

STREAM_TOKEN = 0
STREAM_MEMBER = 1
STREAM_MIXTURE = 2

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds on uint32 tensors (counter c0..c3, key k0, k1)."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _key_words(seed):
    """int64 seed -> (k0, k1) uint32."""
    s = seed.to(tl.int64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def uniform_from_bits(r):
    """uint32 -> fp32 uniform ((r >> 9) + 0.5) * 2**-23, exact, in (0, 1)."""
    return ((r >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _gumbel_from_bits(r):
    u = uniform_from_bits(r)
    return -tl.log(-tl.log(u))


@triton.jit
def gumbel_tile(start, seed, offset, stream: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Gumbel(0, 1) noise of a [ROWS, COLS] tile whose element (r, c) is element start + r * COLS + c.

    `start` and COLS must be multiples of 4: one Philox call covers 4 consecutive elements.
    """
    k0, k1 = _key_words(seed)
    off = offset.to(tl.int64)
    o_lo = (off & 0xFFFFFFFF).to(tl.uint32)
    o_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = ((start // 4) + tl.arange(0, ROWS)[:, None] * (COLS // 4) + tl.arange(0, COLS // 4)[None, :]).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox4x32_10(c0, zero + o_lo, zero + o_hi, zero + stream, k0, k1)
    # interleave(interleave(r0, r2), interleave(r1, r3)) = r0[0], r1[0], r2[0], r3[0], r0[1], ...
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return _gumbel_from_bits(r)


@triton.jit
def gumbel_at(idx, seed, offset, stream: tl.constexpr):
    """Gumbel(0, 1) noise for arbitrary element indices `idx` (any shape, int)."""
    k0, k1 = _key_words(seed)
    off = offset.to(tl.int64)
    o_lo = (off & 0xFFFFFFFF).to(tl.uint32)
    o_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    i = idx.to(tl.int32)
    c0 = (i >> 2).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox4x32_10(c0, zero + o_lo, zero + o_hi, zero + stream, k0, k1)
    w = i & 3
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return _gumbel_from_bits(r)


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


def uniforms_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """fp32 [B, n]: the uniforms of elements 0..n-1 for rows with int64 seed [B] / offset [B],
    bit-identical to what the kernels draw. On the CPU the compiled helper
    torch.ops.me.philox_uniforms computes the same words in one pass (a whole vocabulary per
    decode step: milliseconds as ~200 tensor ops, tens of microseconds in C++)."""
    if seed.device.type == "cpu":
        from ._ops import EXTENSION_LOADED

        if EXTENSION_LOADED:
            seed = seed.to(torch.int64).reshape(-1)
            offset = offset.to(torch.int64).reshape(-1).expand(seed.shape[0]).contiguous()
            return torch.ops.me.philox_uniforms(seed.contiguous(), offset, stream, n)
    return philox_uniforms_torch(seed, offset, stream, n)


def philox_uniforms_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """`uniforms_torch` in plain torch ops (any device)."""
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


def gumbel_torch(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """fp32 [B, n] Gumbel(0, 1) noise, -log(-log(u)) of `uniforms_torch`."""
    return -torch.log(-torch.log(uniforms_torch(seed, offset, stream, n)))


# --------------------------------------------------------------------------------------------
# Test / debug entry: the uniforms the kernels draw, computed by a Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _uniforms_kernel(seed_ptr, off_ptr, out_ptr, n, stream: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(off_ptr + row)
    k0, k1 = _key_words(seed)
    o_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    o_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    start = tl.program_id(1) * BLOCK
    c0 = ((start // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox4x32_10(c0, zero + o_lo, zero + o_hi, zero + stream, k0, k1)
    u = uniform_from_bits(tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)))
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * n + offs, u, mask=offs < n)


def uniforms_triton(seed: torch.Tensor, offset: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """fp32 [B, n]: the uniforms of elements 0..n-1 drawn by the Triton kernels (CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1); equal bit for bit to `uniforms_torch`."""
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    out = torch.empty((seed.shape[0], n), dtype=torch.float32, device=seed.device)
    block = 256
    with on_device(seed.device):
        _uniforms_kernel[(seed.shape[0], triton.cdiv(n, block))](seed, offset, out, n, stream, BLOCK=block)
    return out
