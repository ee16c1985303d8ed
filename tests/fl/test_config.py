import dataclasses

import pytest

from mlsyskit.errors import UserError
from mlsyskit.fl.config import FLConfig


def test_dataset_dependent_defaults():
    img = FLConfig().resolved()
    assert (img.model, img.partition, img.clients, img.lr) == ("cnn", "iid", 100, 0.05)
    char = FLConfig(dataset="shakespeare").resolved()
    assert (char.model, char.partition, char.clients, char.lr) == ("lstm", "natural", None, 1.47)
    assert FLConfig(dataset="shakespeare", model="transformer").resolved().lr == 0.5
    assert FLConfig(dataset="shakespeare", partition="iid").resolved().clients == 100
    assert FLConfig(lr=0.2).resolved().lr == 0.2  # an explicit value always wins


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(krum_f=-1), "--krum-f"),
        (dict(trim_ratio=0.5), "--trim-ratio"),
        (dict(server_momentum=1.0), "--server-momentum"),
        (dict(malicious=200), "exceeds --clients"),
        (dict(target_accuracy=1.5), "--target-accuracy"),
        (dict(eval_every=0), "--eval-every"),
        (dict(client_exec="gpu"), "--client-exec"),
        (dict(attack="rootkit"), "unknown attack"),
        (dict(partition="random"), "unknown partition"),
        (dict(alpha=0.0), "--alpha"),
    ],
)
def test_each_bad_value_names_its_flag(change, needle):
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        dataclasses.replace(FLConfig(), **change).resolved()


def test_json_round_trip(tmp_path):
    cfg = FLConfig(dataset="mnist-5k", lr=0.3, batch_size=None, target_accuracy=0.9).resolved()
    path = tmp_path / "config.json"
    import json

    path.write_text(json.dumps(cfg.to_json()))
    assert FLConfig.from_json(path) == cfg
    path.write_text("{broken")
    with pytest.raises(UserError, match="cannot read run config"):
        FLConfig.from_json(path)


@pytest.mark.parametrize("strategy", ["krum", "multi-krum"])
def test_krum_needs_more_than_2f_plus_2_clients_a_round(strategy):
    with pytest.raises(UserError, match=r"--krum-f 50 needs more than 2f \+ 2 = 102 clients a round, but a round samples 10; use --krum-f 3 or less"):
        FLConfig(strategy=strategy, krum_f=50, clients=100, fraction=0.1).resolved()
    FLConfig(strategy=strategy, krum_f=3, clients=100, fraction=0.1).resolved()  # 10 > 8
    with pytest.raises(UserError, match="at least 3 clients"):
        FLConfig(strategy=strategy, krum_f=0, clients=20, fraction=0.1).resolved()


def test_max_update_norm_must_be_positive():
    with pytest.raises(UserError, match="--max-update-norm"):
        FLConfig(max_update_norm=0.0).resolved()
