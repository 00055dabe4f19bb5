"""Counter-based randomness shared by the Triton kernels and the torch references.

Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), written
twice: once in Triton here (`philox4x32_10`, `tl.umulhi`) and once in plain torch int64
arithmetic in me_kernels._philox (`philox4x32_10_torch`, used by the references). Both produce the same 32-bit words, checked against the Random123
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
    STREAM_ACCEPT  = 3   verify_draft(): acceptance uniforms
    STREAM_RESIDUAL = 4  verify_draft(): residual draws

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
from ._philox import STREAM_MEMBER, STREAM_MIXTURE, STREAM_TOKEN

__all__ = [
    "STREAM_TOKEN",
    "STREAM_MEMBER",
    "STREAM_MIXTURE",
    "philox4x32_10",
    "uniform_from_bits",
    "gumbel_tile",
    "gumbel_at",
    "uniform_at",
    "uniforms_triton",
]


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
def uniform_at(idx, seed, offset, stream: tl.constexpr):
    """The fp32 uniform in (0, 1) of arbitrary element indices `idx` (any shape, int)."""
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
    return uniform_from_bits(r)


@triton.jit
def gumbel_at(idx, seed, offset, stream: tl.constexpr):
    """Gumbel(0, 1) noise for arbitrary element indices `idx` (any shape, int)."""
    return -tl.log(-tl.log(uniform_at(idx, seed, offset, stream)))


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
    CPU tensors under TRITON_INTERPRET=1); equal bit for bit to `me_kernels._philox.philox_uniforms_torch`."""
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    out = torch.empty((seed.shape[0], n), dtype=torch.float32, device=seed.device)
    block = 256
    with on_device(seed.device):
        _uniforms_kernel[(seed.shape[0], triton.cdiv(n, block))](seed, offset, out, n, stream, BLOCK=block)
    return out
