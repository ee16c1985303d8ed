"""--compress int8: updates quantized with mlsyskit.quant, ~4x fewer bytes up, accuracy kept."""

import json

import pytest
import torch

from mlsyskit.errors import UserError
from mlsyskit.fl import FLConfig, run, wire
from mlsyskit.fl.compress import BLOCK, quantize_update


def test_int8_update_roundtrips_within_half_a_block_scale_in_a_quarter_of_the_bytes():
    gen = torch.Generator().manual_seed(0)
    p = 7850  # logreg's parameters: not a multiple of the block
    global_w = torch.randn(p, generator=gen)
    w = global_w + torch.randn(p, generator=gen) * torch.linspace(1e-4, 1e-1, p)  # blocks of very different range
    blob = wire.encode_update(w, global_w, "int8")
    back = wire.decode_update(blob, p, global_w, "int8")
    _, scales = quantize_update(w - global_w)
    err = (back - w).abs()
    bound = scales.repeat_interleave(BLOCK)[:p] / 2 + 1e-6 * w.abs()  # plus float32 rounding of the sum
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # it really is quantized
    ratio = len(wire.encode_model(w)) / len(blob)
    assert 3.8 < ratio < 4.0
    for bad, why in [(wire.encode_model(w), "int8 update"), (wire.encode_update(w[:-1], global_w[:-1], "int8"), "wrong shape")]:
        with pytest.raises(ValueError, match=why):
            wire.decode_update(bad, p, global_w, "int8")


def test_compressed_run_sends_a_quarter_of_the_bytes_and_keeps_accuracy(tmp_path, data_dir):
    def go(name, **kw):
        cfg = FLConfig(dataset="mnist-5k", data_dir=str(data_dir) if data_dir else None, model="logreg", clients=10,
                       fraction=0.5, local_epochs=1, batch_size=50, lr=0.1, rounds=3, out=str(tmp_path / name), **kw)
        run(cfg, progress=False)
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    plain, packed = go("plain"), go("int8", compress="int8")
    for p, q in zip(plain, packed, strict=True):
        assert 3.8 < p["bytes_up"] / q["bytes_up"] < 4.0 and q["bytes_down"] == p["bytes_down"]
        # the stated tolerance: int8 updates cost at most 1 point of test accuracy here
        assert abs(q["test_accuracy"] - p["test_accuracy"]) < 0.01
    assert plain[-1]["test_loss"] != packed[-1]["test_loss"]  # the quantized updates were really used


@pytest.mark.parametrize("kw, msg", [(dict(compress="int4"), "unknown --compress"), (dict(compress="int8", secagg=True), "--secagg")])
def test_bad_compress_flags_are_one_clear_error(kw, msg):
    with pytest.raises(UserError, match=msg):
        FLConfig(clients=10, model="logreg", **kw).resolved()
