"""Quantized checkpoints: bit-exact reload, sizes on disk by hand, clear errors."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mlsyskit.errors import UserError
from mlsyskit.quant.scheme import QuantScheme
from mlsyskit.quant.storage import load_quantized, save_quantized, storage_bytes
from mlsyskit.quant.tensor import QuantizedTensor, quantize_tensor

SCHEMES = [
    QuantScheme(bits=8),
    QuantScheme(bits=4, granularity="group", group_size=16, symmetric=False),
    QuantScheme(bits=3, granularity="group", group_size=8, scale_dtype="bfloat16"),
    QuantScheme(bits=2, granularity="tensor", symmetric=False),
    QuantScheme(bits=8, granularity="channel", symmetric=False, scale_dtype="bfloat16"),
    QuantScheme(bits=3, granularity="channel", symmetric=False),
]


def weight(out, inf, seed=0):
    return torch.randn(out, inf, generator=torch.Generator().manual_seed(seed))


def assert_same_qt(a, b):
    assert isinstance(b, QuantizedTensor) and a.scheme == b.scheme
    assert a.codes.dtype == b.codes.dtype and torch.equal(a.codes, b.codes)
    assert b.scale.dtype == torch.float32 and torch.equal(a.scale, b.scale)
    if a.zero is None:
        assert b.zero is None
    else:
        assert torch.equal(a.zero.float(), b.zero)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_round_trip_is_bit_exact(tmp_path):
    tensors = {f"layers.{i}.w": quantize_tensor(weight(5, 48, i), s) for i, s in enumerate(SCHEMES)}
    plain = {
        "norm.weight": torch.randn(48),
        "emb": torch.randn(7, 3).to(torch.bfloat16),
        "ids": torch.arange(5),
        "layers.0.w.bias": torch.ones(5, dtype=torch.float16),
    }
    meta = {"model": "tiny", "calibration": {"samples": 8, "clip": [0.5, 1.0]}}
    save_quantized(tmp_path / "ckpt", {**tensors, **plain}, meta)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors",
        "quant_config.json",
    ]
    loaded, meta2 = load_quantized(tmp_path / "ckpt")
    assert meta2 == meta
    assert set(loaded) == set(tensors) | set(plain)
    for name, qt in tensors.items():
        assert_same_qt(qt, loaded[name])
    for name, t in plain.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    config = json.loads((tmp_path / "ckpt" / "quant_config.json").read_text())
    assert config["format"] == "mlsyskit-quant" and config["version"] == 1
    assert config["tensors"]["layers.1.w"] == {"shape": [5, 48], "scheme": SCHEMES[1].to_dict()}
    assert config["model"] == "tiny"


def test_saving_again_overwrites_atomically(tmp_path):
    save_quantized(tmp_path, {"w": quantize_tensor(weight(2, 8), SCHEMES[0])}, {"step": 1})
    qt = quantize_tensor(weight(3, 16, 1), SCHEMES[1])
    save_quantized(tmp_path, {"w": qt}, {"step": 2})
    loaded, meta = load_quantized(tmp_path)
    assert meta == {"step": 2}
    assert_same_qt(qt, loaded["w"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def safetensors_header_bytes(path):
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize(
    ("shape", "scheme", "payload"),
    [
        # 4-bit g16 asym: codes 64*128/2, fp16 scales 64*8*2, 4-bit zeros 64*8/2
        ((64, 128), QuantScheme(4, "group", 16, False), 64 * 128 // 2 + 64 * 8 * 2 + 64 * 8 // 2),
        # 8-bit per channel sym: codes 1 byte each + one fp16 scale per row
        ((64, 128), QuantScheme(8), 64 * 128 + 64 * 2),
        # 3-bit per tensor: 3*5 = 15 codes -> 45 bits -> 6 bytes; one scale
        ((3, 5), QuantScheme(3, "tensor"), 6 + 2),
        # 2-bit channel asym: 7*9 = 63 codes -> 126 bits -> 16 bytes; 7 scales; 7 zeros -> 2 bytes
        ((7, 9), QuantScheme(2, "channel", symmetric=False), 16 + 14 + 2),
    ],
)
def test_storage_bytes_by_hand(tmp_path, shape, scheme, payload):
    qt = quantize_tensor(weight(*shape), scheme)
    save_quantized(tmp_path, {"w": qt}, {})
    weights, config = tmp_path / "model.safetensors", tmp_path / "quant_config.json"
    header = safetensors_header_bytes(weights)
    total = storage_bytes(tmp_path)
    assert total == payload + header + config.stat().st_size
    assert header < 1024 and config.stat().st_size < 1024
    # the payload is bits_per_weight * n / 8 up to the last partial byte of codes and zeros
    n = shape[0] * shape[1]
    assert 0 <= payload - scheme.bits_per_weight(*shape) * n / 8 < 2


def test_bad_saves_are_user_errors(tmp_path):
    qt = quantize_tensor(weight(2, 8), SCHEMES[0])
    with pytest.raises(UserError, match="reserved"):
        save_quantized(tmp_path, {"w": qt}, {"tensors": 1})
    with pytest.raises(UserError, match="JSON"):
        save_quantized(tmp_path, {"w": qt}, {"x": object()})
    with pytest.raises(UserError, match="'w.scale'"):
        save_quantized(tmp_path, {"w": qt, "w.scale": torch.ones(1)}, {})
    with pytest.raises(UserError, match="not a tensor"):
        save_quantized(tmp_path, {"w": [1, 2]}, {})
    odd = QuantizedTensor(qt.codes, qt.scale + 1e-4, None, qt.scheme)
    with pytest.raises(UserError, match="not exactly representable in float16"):
        save_quantized(tmp_path, {"w": odd}, {})
    with pytest.raises(UserError, match="outside"):
        bad = qt.codes.clone()
        bad[0, 0] = -128
        save_quantized(tmp_path, {"w": QuantizedTensor(bad, qt.scale, None, qt.scheme)}, {})
    assert not (tmp_path / "model.safetensors").exists()


@pytest.fixture
def saved(tmp_path):
    a = quantize_tensor(weight(4, 32), SCHEMES[1])
    save_quantized(tmp_path / "a", {"w": a, "b": torch.ones(4)}, {"m": 1})
    c = quantize_tensor(weight(4, 32), SCHEMES[0])
    save_quantized(tmp_path / "c", {"w": c}, {})
    return tmp_path


def test_missing_files_are_user_errors(saved):
    with pytest.raises(UserError, match="not a directory"):
        load_quantized(saved / "nope")
    with pytest.raises(UserError, match="not a directory"):
        storage_bytes(saved / "nope")
    (saved / "a" / "quant_config.json").unlink()
    with pytest.raises(UserError, match="quant_config.json is missing"):
        load_quantized(saved / "a")
    (saved / "c" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_quantized(saved / "c")


def test_corrupt_files_are_user_errors(saved):
    cfg = saved / "a" / "quant_config.json"
    good = cfg.read_text()
    cfg.write_text(good[:20])
    with pytest.raises(UserError, match="quant_config.json is unreadable"):
        load_quantized(saved / "a")
    cfg.write_text(json.dumps({**json.loads(good), "format": "gguf"}))
    with pytest.raises(UserError, match="not a mlsyskit-quant config"):
        load_quantized(saved / "a")
    cfg.write_text(json.dumps({**json.loads(good), "version": 9}))
    with pytest.raises(UserError, match="version 9"):
        load_quantized(saved / "a")
    cfg.write_text(good)
    st = saved / "a" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(UserError, match="model.safetensors is unreadable"):
        load_quantized(saved / "a")


def test_mismatched_files_are_user_errors(saved):
    # a config from another checkpoint (e.g. a save interrupted between the two files)
    (saved / "c" / "quant_config.json").write_text((saved / "a" / "quant_config.json").read_text())
    with pytest.raises(UserError, match="does not match"):
        load_quantized(saved / "c")


def test_tampered_tensors_are_user_errors(saved):
    from safetensors.torch import load_file

    path = saved / "a" / "model.safetensors"
    flat = load_file(str(path))
    meta = {
        "format": "mlsyskit-quant",
        "tensors": json.dumps(
            json.loads((saved / "a" / "quant_config.json").read_text())["tensors"], sort_keys=True
        ),
    }
    save_file({**flat, "w.qweight": flat["w.qweight"][:-1]}, str(path), metadata=meta)
    with pytest.raises(UserError, match=r"'w'.*corrupt.*bytes"):
        load_quantized(saved / "a")
    save_file({k: v for k, v in flat.items() if k != "w.zero"}, str(path), metadata=meta)
    with pytest.raises(UserError, match=r"'w'.*corrupt.*w\.zero"):
        load_quantized(saved / "a")
    save_file({**flat, "w.scale": flat["w.scale"].float()}, str(path), metadata=meta)
    with pytest.raises(UserError, match=r"'w'.*corrupt.*scale"):
        load_quantized(saved / "a")
