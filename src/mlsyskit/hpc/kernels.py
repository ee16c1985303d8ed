"""Image kernels three ways: Triton (the GPU path), torch, numpy (the references).

``grayscale(img)``: (H, W, 3) RGB (uint8 or float) -> float32 (H, W), BT.601 weights.
``conv2d_relu(x, w, b, stride, padding)``: NCHW float32 -> relu(conv2d(x, w) + b).
The Triton back end runs on a CUDA GPU, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported: slow, for checking correctness).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlsyskit.errors import UserError

GRAY = (0.299, 0.587, 0.114)
BACKENDS = ("triton", "torch", "numpy")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton() -> tuple[Any, Any]:
    if not torch.cuda.is_available() and not interpreting():
        raise UserError("the Triton kernels need a CUDA GPU; without one set TRITON_INTERPRET=1 before starting "
                        "Python to run them in Triton's (slow) interpreter, or use backend='torch'")
    try:
        import triton

        from mlsyskit.hpc import triton_kernels
    except ImportError as e:
        raise UserError(f"the Triton kernels need the triton package ({e}); pip install triton") from None
    return triton, triton_kernels


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not interpreting() else torch.device("cpu")


def grayscale(img: np.ndarray | torch.Tensor, backend: str = "torch") -> np.ndarray | torch.Tensor:
    """BT.601 luma of an (H, W, 3) RGB image as float32 (H, W), same scale as the input."""
    if img.shape[-1] != 3 or img.ndim != 3:
        raise UserError(f"grayscale takes an (H, W, 3) RGB image, got shape {tuple(img.shape)}")
    if backend == "numpy":
        return np.asarray(img, dtype=np.float32) @ np.array(GRAY, dtype=np.float32)
    t = torch.as_tensor(img)
    if backend == "torch":
        return t.to(torch.float32) @ torch.tensor(GRAY, dtype=torch.float32, device=t.device)
    if backend != "triton":
        raise UserError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    triton, k = _triton()
    t = t.contiguous()
    out = torch.empty(t.shape[:2], dtype=torch.float32, device=t.device)
    n = out.numel()
    block = 1024
    k.grayscale_kernel[(triton.cdiv(n, block),)](t, out, n, BLOCK=block)
    return out


def conv2d_relu(x: Any, w: Any, b: Any = None, stride: int = 1, padding: int = 0, backend: str = "torch") -> Any:
    """relu(conv2d(x, w, b)) for NCHW float32 input x, weight (K, C, R, S), bias (K,)."""
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise UserError(f"conv2d_relu takes x (N, C, H, W) and w (K, C, R, S); got {tuple(x.shape)} and {tuple(w.shape)}")
    if stride < 1 or padding < 0:
        raise UserError(f"stride must be >= 1 and padding >= 0; got {stride}, {padding}")
    if backend == "numpy":
        return _conv2d_relu_numpy(np.asarray(x, np.float32), np.asarray(w, np.float32),
                                  None if b is None else np.asarray(b, np.float32), stride, padding)
    xt, wt = torch.as_tensor(x), torch.as_tensor(w)
    bt = None if b is None else torch.as_tensor(b)
    if backend == "torch":
        return torch.relu(F.conv2d(xt, wt, bt, stride=stride, padding=padding))
    if backend != "triton":
        raise UserError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    triton, k = _triton()
    n, c, h, wd = xt.shape
    kk, _, r, s = wt.shape
    p, q = (h + 2 * padding - r) // stride + 1, (wd + 2 * padding - s) // stride + 1
    if p < 1 or q < 1:
        raise UserError(f"the {r}x{s} kernel does not fit the {h}x{wd} input with padding {padding}")
    xt, wt = xt.contiguous().float(), wt.contiguous().float()
    out = torch.empty((n, kk, p, q), dtype=torch.float32, device=xt.device)
    block_k, block_pq = 16, 64
    grid = (n, triton.cdiv(kk, block_k), triton.cdiv(p * q, block_pq))
    k.conv2d_relu_kernel[grid](xt, wt, bt.contiguous().float() if bt is not None else xt, out, c, h, wd, kk, p, q,
                               stride, padding, R=r, S=s, HAS_BIAS=bt is not None, BLOCK_K=block_k, BLOCK_PQ=block_pq)
    return out


def _conv2d_relu_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    """im2col through sliding_window_view, then one tensordot."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    r, s = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(xp, (r, s), axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.einsum("ncpqrs,kcrs->nkpq", win, w, optimize=True)
    if b is not None:
        out += b[None, :, None, None]
    return np.maximum(out, 0.0).astype(np.float32)


def _time(fn: Any, repeat: int, cuda: bool) -> float:
    fn()  # warm-up (Triton compiles here)
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run_kernels(repeat: int = 20, out: str | None = None) -> dict[str, Any]:
    """Check both kernels against torch and numpy; on a GPU also time them (best of
    ``repeat``). Without a GPU: checked under the interpreter when TRITON_INTERPRET=1 is set
    (this command sets it when triton has not been imported yet), never timed."""
    import sys

    cuda = torch.cuda.is_available()
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not cuda and not interpreting():
        return {"checked": False, "timed": False, "message": "no CUDA GPU and TRITON_INTERPRET is off: nothing run"}
    dev = _device()
    g = torch.Generator().manual_seed(0)
    small = {"img": torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8, generator=g),
             "x": torch.randn(2, 3, 17, 19, generator=g), "w": torch.randn(8, 3, 3, 3, generator=g),
             "b": torch.randn(8, generator=g)}
    checks = {}
    img = small["img"].to(dev)
    gray = grayscale(img, "triton").cpu()
    checks["grayscale_max_abs_err_vs_torch"] = float((gray - grayscale(small["img"], "torch")).abs().max())
    checks["grayscale_max_abs_err_vs_numpy"] = float(np.abs(gray.numpy() - grayscale(small["img"].numpy(), "numpy")).max())
    conv = conv2d_relu(small["x"].to(dev), small["w"].to(dev), small["b"].to(dev), 1, 1, "triton").cpu()
    ref = conv2d_relu(small["x"], small["w"], small["b"], 1, 1, "torch")
    checks["conv_max_abs_err_vs_torch"] = float((conv - ref).abs().max())
    checks["conv_max_abs_err_vs_numpy"] = float(np.abs(conv.numpy() - conv2d_relu(
        small["x"].numpy(), small["w"].numpy(), small["b"].numpy(), 1, 1, "numpy")).max())
    result: dict[str, Any] = {"checked": True, "device": str(dev), "interpreter": interpreting(), **checks}
    if not cuda:
        result.update(timed=False, message="no CUDA GPU: the Triton kernels were checked under Triton's interpreter "
                      f"(max error vs torch: grayscale {checks['grayscale_max_abs_err_vs_torch']:.2e}, conv2d+ReLU "
                      f"{checks['conv_max_abs_err_vs_torch']:.2e}) and are not timed; run on a GPU to time them")
    else:
        big_img = torch.randint(0, 256, (2160, 3840, 3), dtype=torch.uint8, device=dev)
        x = torch.randn(32, 64, 56, 56, device=dev)
        w, b = torch.randn(64, 64, 3, 3, device=dev), torch.randn(64, device=dev)
        timings = {
            "grayscale_4k_triton_s": _time(lambda: grayscale(big_img, "triton"), repeat, True),
            "grayscale_4k_torch_s": _time(lambda: grayscale(big_img, "torch"), repeat, True),
            "conv_triton_s": _time(lambda: conv2d_relu(x, w, b, 1, 1, "triton"), repeat, True),
            "conv_torch_s": _time(lambda: conv2d_relu(x, w, b, 1, 1, "torch"), repeat, True),
        }
        host = big_img.cpu().numpy()
        timings["grayscale_4k_numpy_cpu_s"] = _time(lambda: grayscale(host, "numpy"), 3, False)
        result.update(timed=True, gpu=torch.cuda.get_device_name(), conv_shape="x 32x64x56x56, w 64x64x3x3, pad 1",
                      **timings, message=f"on {torch.cuda.get_device_name()}: grayscale 4K triton "
                      f"{timings['grayscale_4k_triton_s'] * 1e3:.3f} ms vs torch {timings['grayscale_4k_torch_s'] * 1e3:.3f} ms; "
                      f"conv2d+ReLU triton {timings['conv_triton_s'] * 1e3:.3f} ms vs torch (cuDNN) {timings['conv_torch_s'] * 1e3:.3f} ms")
    if out:
        import json

        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "hpc_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
