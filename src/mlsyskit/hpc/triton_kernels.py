"""Triton kernels: RGB to grayscale, and conv2d + bias + ReLU fused in one pass.

Importing this module imports triton; ``mlsyskit.hpc.kernels`` does it lazily. Without a GPU
they run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grayscale_kernel(rgb_ptr, out_ptr, n_pixels, BLOCK: tl.constexpr):
    """out[i] = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601) for interleaved (..., 3) pixels."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pixels
    r = tl.load(rgb_ptr + offs * 3, mask=m, other=0).to(tl.float32)
    g = tl.load(rgb_ptr + offs * 3 + 1, mask=m, other=0).to(tl.float32)
    b = tl.load(rgb_ptr + offs * 3 + 2, mask=m, other=0).to(tl.float32)
    tl.store(out_ptr + offs, 0.299 * r + 0.587 * g + 0.114 * b, mask=m)


@triton.jit
def conv2d_relu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, K, P, Q, stride, pad,
                       R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_PQ: tl.constexpr):
    """Direct convolution, NCHW, one (image, block of output channels, block of output
    pixels) per program: acc[k, pq] += w[k, c, r, s] * x[c, ih, iw] over c, r, s (each loaded
    input value is reused by BLOCK_K channels); then bias and ReLU before the single store."""
    n = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    pq = tl.program_id(2) * BLOCK_PQ + tl.arange(0, BLOCK_PQ)
    k_ok = ks < K
    pq_ok = pq < P * Q
    p = pq // Q
    q = pq % Q
    acc = tl.zeros((BLOCK_K, BLOCK_PQ), dtype=tl.float32)
    for c in range(0, C):
        for r in tl.static_range(R):
            ih = p * stride - pad + r
            h_ok = (ih >= 0) & (ih < H)
            for s in tl.static_range(S):
                iw = q * stride - pad + s
                ok = pq_ok & h_ok & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + ((n * C + c) * H + ih) * W + iw, mask=ok, other=0.0)
                wv = tl.load(w_ptr + ((ks * C + c) * R + r) * S + s, mask=k_ok, other=0.0)
                acc += wv[:, None] * xv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ks, mask=k_ok, other=0.0)[:, None]
    acc = tl.maximum(acc, 0.0)
    out = out_ptr + (n * K + ks[:, None]) * (P * Q) + pq[None, :]
    tl.store(out, acc, mask=k_ok[:, None] & pq_ok[None, :])
