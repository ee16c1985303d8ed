"""QuantScheme: validation, (de)serialization, group counts and bits per weight by hand."""

import subprocess
import sys

import pytest

from mlsyskit.errors import UserError
from mlsyskit.quant.scheme import QuantScheme


def test_defaults_and_code_ranges():
    s = QuantScheme()
    assert (s.bits, s.granularity, s.group_size, s.symmetric, s.scale_dtype) == (
        8,
        "channel",
        128,
        True,
        "float16",
    )
    assert (s.qmin, s.qmax) == (-127, 127)
    assert (QuantScheme(bits=4).qmin, QuantScheme(bits=4).qmax) == (-7, 7)
    assert (QuantScheme(bits=3).qmin, QuantScheme(bits=3).qmax) == (-3, 3)
    assert (QuantScheme(bits=2).qmin, QuantScheme(bits=2).qmax) == (-1, 1)
    assert (
        QuantScheme(bits=3, symmetric=False).qmin,
        QuantScheme(bits=3, symmetric=False).qmax,
    ) == (0, 7)
    assert QuantScheme(bits=8, symmetric=False).qmax == 255


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"bits": 5}, ["bits", "5", "8, 4, 3, 2"]),
        ({"bits": 16}, ["bits", "16"]),
        ({"bits": True}, ["bits"]),
        ({"granularity": "row"}, ["granularity", "'row'", "tensor, channel, group"]),
        ({"scale_dtype": "float32"}, ["scale dtype", "'float32'", "float16, bfloat16"]),
        ({"group_size": 0}, ["group_size", "0"]),
        ({"symmetric": "yes"}, ["symmetric"]),
    ],
)
def test_bad_schemes_are_user_errors(kwargs, words):
    with pytest.raises(UserError) as e:
        QuantScheme(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_n_groups():
    assert QuantScheme(granularity="group", group_size=128).n_groups(4096) == 32
    assert QuantScheme(granularity="group", group_size=48).n_groups(96) == 2  # any divisor
    assert QuantScheme(granularity="channel").n_groups(100) == 1
    assert QuantScheme(granularity="tensor").n_groups(100) == 1
    with pytest.raises(UserError, match=r"group_size 128 does not divide in_features 4000"):
        QuantScheme(granularity="group", group_size=128).n_groups(4000)


def test_bits_per_weight_by_hand():
    g128_asym = QuantScheme(bits=4, granularity="group", group_size=128, symmetric=False)
    assert g128_asym.bits_per_weight(4096, 4096) == 4 + (16 + 4) / 128
    assert QuantScheme(bits=8).bits_per_weight(4096, 4096) == 8 + 16 / 4096
    assert QuantScheme(bits=8, granularity="tensor").bits_per_weight(64, 32) == 8 + 16 / (64 * 32)
    g64_sym3 = QuantScheme(bits=3, granularity="group", group_size=64, scale_dtype="bfloat16")
    assert g64_sym3.bits_per_weight(10, 256) == 3 + 16 / 64
    assert QuantScheme(bits=2, symmetric=False).bits_per_weight(7, 100) == 2 + 18 / 100


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_dict_round_trip(bits, granularity):
    import json

    s = QuantScheme(bits, granularity, 64, bits % 2 == 0, "bfloat16")
    d = json.loads(json.dumps(s.to_dict()))
    assert QuantScheme.from_dict(d) == s
    assert QuantScheme.from_dict({"bits": 4}) == QuantScheme(bits=4)


def test_from_dict_refuses_bad_input():
    with pytest.raises(UserError, match="unknown quantization scheme key"):
        QuantScheme.from_dict({"bits": 4, "nbits": 4})
    with pytest.raises(UserError, match="JSON object"):
        QuantScheme.from_dict([4])
    with pytest.raises(UserError, match="bits"):
        QuantScheme.from_dict({"bits": 6})


def test_package_import_is_light():
    code = (
        "import sys, mlsyskit.quant, mlsyskit.quant.scheme; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert mlsyskit.quant.QuantScheme is mlsyskit.quant.scheme.QuantScheme"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
