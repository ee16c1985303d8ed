"""The Triton kernels against torch and numpy (under TRITON_INTERPRET=1 without a GPU)."""

import numpy as np
import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.hpc.kernels import conv2d_relu, grayscale, run_kernels

triton = pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("h", "w", "dtype"), [(1, 1, torch.uint8), (37, 53, torch.uint8), (64, 48, torch.float32)])
def test_grayscale_matches_torch_and_numpy(h, w, dtype):
    g = torch.Generator().manual_seed(h * w)
    img = torch.randint(0, 256, (h, w, 3), generator=g).to(dtype)
    if dtype == torch.float32:
        img = img / 255
    out = grayscale(img.to(DEV), "triton").cpu()
    assert out.shape == (h, w) and out.dtype == torch.float32
    torch.testing.assert_close(out, grayscale(img, "torch"), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out.numpy(), grayscale(img.numpy(), "numpy"), rtol=1e-6, atol=1e-4)
    px = img[h // 2, w // 2].double()
    assert abs(float(out[h // 2, w // 2]) - float(0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2])) < 1e-3


@pytest.mark.parametrize(("n", "c", "hw", "k", "rs", "stride", "pad", "bias"), [
    (1, 4, (12, 12), 20, (5, 5), 2, 2, True),    # stride 2, K not a multiple of the block
    (3, 1, (9, 7), 5, (1, 3), 1, 0, False),      # no bias, rectangular kernel
])
def test_fused_conv2d_relu_matches_torch_and_numpy(n, c, hw, k, rs, stride, pad, bias):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(n, c, *hw, generator=g)
    w = torch.randn(k, c, *rs, generator=g)
    b = torch.randn(k, generator=g) if bias else None
    out = conv2d_relu(x.to(DEV), w.to(DEV), None if b is None else b.to(DEV), stride, pad, "triton").cpu()
    ref = conv2d_relu(x, w, b, stride, pad, "torch")
    assert out.shape == ref.shape and (ref == 0).any() and (ref > 0).any()  # ReLU clipped some, kept some
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref_np = conv2d_relu(x.numpy(), w.numpy(), None if b is None else b.numpy(), stride, pad, "numpy")
    np.testing.assert_allclose(out.numpy(), ref_np, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match=r"\(H, W, 3\)"):
        grayscale(np.zeros((4, 4, 4), np.uint8), "numpy")
    with pytest.raises(UserError, match="does not fit"):
        conv2d_relu(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 5, 5), backend="triton")
    with pytest.raises(UserError, match="unknown backend"):
        grayscale(np.zeros((2, 2, 3), np.uint8), "cuda")


def test_run_kernels_checks_and_says_why_it_does_not_time():
    """The command's own check: odd sizes (2x3x17x19, 8 3x3 filters, same padding), 37x53 image."""
    r = run_kernels()
    assert r["checked"] and r["conv_max_abs_err_vs_torch"] < 1e-4 and r["grayscale_max_abs_err_vs_numpy"] < 1e-3
    if not torch.cuda.is_available():
        assert r["timed"] is False and "no CUDA GPU" in r["message"]
