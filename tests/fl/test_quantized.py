"""INT8 / INT4 accuracy of the federated-learning image models on real MNIST digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mlsyskit.data.load import load_dataset
from mlsyskit.errors import UserError
from mlsyskit.fl.quantized import cnn_quantization_accuracy
from mlsyskit.models.vision import CNN, MLP


@pytest.fixture(scope="module")
def mnist(data_dir: Path | None):
    if data_dir is None or not (data_dir / "mnist" / "mnist_5k.csv.gz").is_file():
        pytest.skip("real MNIST (mnist_5k.csv.gz) not found: set MLSYSKIT_DATA_DIR")
    return load_dataset("mnist-5k", data_dir, download=False)


def test_int8_and_int4_keep_a_trained_model_accurate(mnist, data_dir: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # a few epochs over the 5,000 real training digits: ~90% test accuracy
        for i in torch.randperm(len(mnist.train_y)).split(50):
            opt.zero_grad()
            F.cross_entropy(model(mnist.train_x[i]), mnist.train_y[i]).backward()
            opt.step()
    res = cnn_quantization_accuracy(model.eval(), data_dir, limit=2000)
    fp32, int8, int4 = res["rows"]
    assert res["test_images"] == 2000 and fp32["name"] == "fp32" and fp32["accuracy"] > 0.85
    assert abs(int8["accuracy_drop"]) <= 0.005
    assert abs(int4["accuracy_drop"]) <= 0.03
    assert fp32["bits_per_weight"] == 32
    # 784 -> 64 -> 10: int4 groups of 128 shrink to 112 for width 784 and to 64 for width 64
    assert int4["group_sizes"] == {"fc1": 112, "fc2": 64}
    n1, n2 = 64 * 784, 10 * 64
    assert int4["bits_per_weight"] == pytest.approx((n1 * (4 + 20 / 112) + n2 * (4 + 20 / 64)) / (n1 + n2))
    assert int8["bits_per_weight"] == pytest.approx((n1 * (8 + 24 / 784) + n2 * (8 + 24 / 64)) / (n1 + n2))


def test_cnn_from_a_fedavg_run_dir(mnist, data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    (tmp_path / "config.json").write_text(json.dumps({"model": "cnn", "dataset": "mnist-5k"}))
    save_file(CNN().state_dict(), str(tmp_path / "model.safetensors"))
    res = cnn_quantization_accuracy(tmp_path, data_dir, limit=200)
    assert res["model"] == "cnn" and res["run_dir"] == str(tmp_path)
    assert "real MNIST test set" in res["test_source"]
    assert [r["name"] for r in res["rows"]] == ["fp32", "int8", "int4-g128"]
    # conv1 25 inputs, conv2 800, fc1 3136, fc2 512: the group of 128 fits each width
    assert res["rows"][2]["group_sizes"] == {"conv1": 25, "conv2": 32, "fc1": 64, "fc2": 128}
    assert res["rows"][2]["model_bytes"] < res["rows"][0]["model_bytes"] / 5
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not a finished fedavg run"):
        cnn_quantization_accuracy(tmp_path, data_dir)
