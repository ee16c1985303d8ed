"""The compiled kernels (:mod:`mlsyskit.quant.kernels`): every instruction-set variant this CPU
runs against a float64 reference on random data, odd sizes included; the variant choice; the
fallback without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from mlsyskit.models.gguf_loader import dequantize_into
from mlsyskit.quant import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.status()}")
VARIANTS = kernels.runnable_variants()
FORMATS = ["Q4_0", "Q4_1", "Q8_0", "U4", "I8"]
# (weight rows, inputs K, activation rows M): one block, an odd number of blocks (a last block
# outside the pairs), SmolLM2's width, rows not a multiple of anything, 1 and 64 rows; up to 7
# activation rows take one-row-at-a-time tiles (of 4, with a remainder), from 8 on rows sit in
# SIMD lanes (tiles of 8 or 16 rows, 4 tiles at a time: 70 rows need a second group)
SHAPES = [(1, 32, 1), (37, 96, 3), (64, 576, 5), (5, 96, 8), (7, 160, 17), (64, 64, 64), (3, 64, 70)]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_part(fmt: str, rows: int, k: int, rng: np.random.Generator) -> tuple[kernels.Part, np.ndarray]:
    """A random weight in ``fmt`` and its float64 value (GGUF blocks dequantized by the loader's
    numpy code, U4/I8 as scale * (q - zero) per group of 32)."""
    nb = k // 32
    if fmt in ("Q4_0", "Q4_1", "Q8_0"):
        bb = kernels.BLOCK_BYTES[fmt]
        raw = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
        raw[:, :, 0:2] = (rng.standard_normal((rows, nb)) * 0.02).astype("<f2").view(np.uint8).reshape(rows, nb, 2)
        if fmt == "Q4_1":
            raw[:, :, 2:4] = (rng.standard_normal((rows, nb)) * 0.1).astype("<f2").view(np.uint8).reshape(rows, nb, 2)
        raw = raw.reshape(rows, nb * bb)
        w = np.empty((rows, k), dtype=np.float32)
        dequantize_into(raw, int(GGMLQuantizationType[fmt]), w)
        return kernels.Part(fmt, raw), w.astype(np.float64)
    scale = torch.from_numpy((rng.random((rows, nb)) * 0.05 + 0.01).astype(np.float32))
    if fmt == "U4":
        codes = rng.integers(0, 16, size=(rows, k), dtype=np.uint8)
        data = kernels.pack_q4_blocks(torch.from_numpy(codes))
        zero = torch.from_numpy(rng.integers(0, 16, size=(rows, nb)).astype(np.float32))
    else:
        codes = rng.integers(-128, 128, size=(rows, k)).astype(np.int8)
        data = torch.from_numpy(codes).view(torch.uint8)
        zero = torch.from_numpy(rng.integers(-20, 20, size=(rows, nb)).astype(np.float32))
    w = (codes.astype(np.float64).reshape(rows, nb, 32) - zero.numpy()[..., None]) * scale.numpy()[..., None]
    return kernels.Part(fmt, data, scale=scale, zero=zero, group_blocks=1), w.reshape(rows, k)


def reference(x: torch.Tensor, w: np.ndarray) -> tuple[np.ndarray, float]:
    """x W^T on the activations as the kernels round them, and the size of the products summed."""
    xq = kernels.fake_quantize_activations(x).double().numpy()
    return xq @ w.T, float((np.abs(xq) @ np.abs(w).T).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_qmatmul_matches_reference(variant: str, fmt: str, n: int, k: int, m: int) -> None:
    lib = kernels.library(variant)[0]
    rng = _rng(n * 1000 + k + m)
    part, w = random_part(fmt, n, k, rng)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    y = kernels.qmatmul(x, kernels.QWeight([part], k), lib=lib).numpy()
    want, size = reference(x, w)
    # integer dot products are exact; the float32 sums differ by rounding only
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_parts_with_a_row_permutation(variant: str) -> None:
    """q|k|v-style parts of different formats in one weight; one part's rows reordered."""
    lib = kernels.library(variant)[0]
    rng = _rng(7)
    (pa, wa), (pb, wb), (pc, wc) = (random_part(f, n, 96, rng) for f, n in (("Q4_1", 12, ), ("Q4_0", 8), ("Q8_0", 5)))
    perm = rng.permutation(8).astype(np.int32)
    pb.perm = torch.from_numpy(perm)
    wb_out = np.empty_like(wb)
    wb_out[perm] = wb  # stored row r is output row perm[r]
    weight = kernels.QWeight([pa, pb, pc], 96)
    assert weight.shape == (25, 96)
    x = torch.from_numpy(rng.standard_normal((3, 96)).astype(np.float32))
    want, size = reference(x, np.concatenate([wa, wb_out, wc]))
    np.testing.assert_allclose(kernels.qmatmul(x, weight, lib=lib).numpy(), want, rtol=0, atol=2e-6 * size)
    dense = kernels.dequantize(weight, lib=lib).double().numpy()
    assert np.array_equal(dense, np.concatenate([wa, wb_out, wc]).astype(np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_and_gather_rows(variant: str, fmt: str) -> None:
    lib = kernels.library(variant)[0]
    part, w = random_part(fmt, 37, 96, _rng(3))
    weight = kernels.QWeight([part], 96)
    want = torch.from_numpy(w.astype(np.float32))
    assert torch.equal(kernels.dequantize(weight, lib=lib), want)  # same float32 operations
    assert torch.equal(kernels.dequantize(weight, torch.bfloat16, lib=lib), want.to(torch.bfloat16))
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(kernels.gather_rows(weight, ids, lib=lib), want[ids])
    with pytest.raises(IndexError):
        kernels.gather_rows(weight, torch.tensor([37]), lib=lib)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16])
def test_decode_attention_over_paged_blocks_equals_sdpa(variant: str, pool_dtype: torch.dtype) -> None:
    """Sequences of 1, 17 and 40 tokens in blocks of 16 scattered over the pool, GQA 4:2; the
    pool in float32 or float16 (new keys and values rounded to nearest even)."""
    lib = kernels.library(variant)[0]
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, bs, nblocks = 4, 2, 64, 16, 12
    k_pool = torch.randn(nblocks, bs, Hkv, D, generator=g).to(pool_dtype)
    v_pool = torch.randn(nblocks, bs, Hkv, D, generator=g).to(pool_dtype)
    lens = [1, 17, 40]
    order = torch.randperm(nblocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        need = -(-n // bs)
        tables.append(order[used : used + need] + [0] * (3 - need))
        used += need
    qkv = torch.randn(3, (H + 2 * Hkv) * D, generator=g)  # q, k, v side by side, as the layer makes them
    q = qkv[:, : H * D].view(3, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(3, Hkv, D)
    v = qkv[:, (H + Hkv) * D :].view(3, Hkv, D)
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens, strict=True)])
    out = kernels.attn_decode(q, k, v, slots, k_pool, v_pool, torch.tensor(tables, dtype=torch.int32),
                              torch.tensor(lens, dtype=torch.int32), D**-0.5, lib=lib)
    flat_k, flat_v = k_pool.view(-1, Hkv, D).float(), v_pool.view(-1, Hkv, D).float()
    # written in place (rounded like torch's float -> half)
    assert torch.equal(flat_k[slots], k.to(pool_dtype).float()) and torch.equal(flat_v[slots], v.to(pool_dtype).float())
    for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
        rows = torch.tensor([t[p // bs] * bs + p % bs for p in range(n)])
        kc, vc = flat_k[rows].transpose(0, 1), flat_v[rows].transpose(0, 1)  # (Hkv, n, D)
        want = F.scaled_dot_product_attention(q[i].unsqueeze(1), kc, vc, enable_gqa=True).squeeze(1)
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


def test_variant_choice_follows_what_the_os_enables() -> None:
    have = kernels.cpu_features()
    assert VARIANTS[0] == kernels.variant() and VARIANTS[-1] == "generic"
    if "avx512_vnni" in have and "avx512" in have:
        assert kernels.variant() == "avx512vnni"
    # the probe (CPUID + XGETBV) never claims more than the CPU lists
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if flags:
        named = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512_vnni": "avx512_vnni",
                 "avx_vnni": "avx_vnni", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8", "avx512": "avx512bw"}
        assert all(named[f] in flags for f in have if f in named)
    lib, why = kernels.library("avx9000")
    assert lib is None and "unknown" in why


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_forced_variant_and_no_compiler(tmp_path: Path) -> None:
    forced = _python("from mlsyskit.quant import kernels; print(kernels.variant())", MLSYSKIT_KERNEL_VARIANT="avx2" if "avx2" in VARIANTS else "generic")
    assert forced.returncode == 0 and forced.stdout.strip() in ("avx2", "generic"), forced.stderr
    # no compiler and an empty cache: no kernels, said once, and quantized layers still compute
    code = """
import torch
from mlsyskit.quant import kernels
from mlsyskit.quant.linear import QuantLinear
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.tensor import quantize_tensor
assert not kernels.available(), kernels.status()
kernels.warn_unavailable("slower"); kernels.warn_unavailable("slower")
qt = quantize_tensor(torch.randn(48, 128), QuantScheme(bits=4, granularity="group", group_size=32, symmetric=False))
layer = QuantLinear(qt)
x = torch.randn(2, 128)
assert layer.kind == "dequant" and torch.equal(layer(x), x @ qt.dequantize().T)
print(kernels.status())
"""
    r = _python(code, CC=str(tmp_path / "no-such-cc"), MLSYSKIT_CACHE_DIR=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "no-such-cc" in r.stdout
    assert r.stderr.count("mlsyskit: compiled kernels unavailable") == 1
