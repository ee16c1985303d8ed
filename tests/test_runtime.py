import ctypes.util

import pytest

from mlsyskit.runtime import keep_freed_memory


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_keep_freed_memory_is_accepted_by_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent (cached)


def test_json_helpers_write_null_for_non_finite_numbers(tmp_path):
    import json

    import numpy as np

    from mlsyskit.runtime import json_dumps, write_json

    obj = {"nan": float("nan"), "inf": [float("inf"), -float("inf"), 1.5], "np": np.array([np.inf, 2.0]),
           "f32": np.float32("nan"), "i64": np.int64(3), "t": (1, float("nan"))}
    want = {"nan": None, "inf": [None, None, 1.5], "np": [None, 2.0], "f32": None, "i64": 3, "t": [1, None]}

    def strict(name):
        raise ValueError(name)

    assert json.loads(json_dumps(obj), parse_constant=strict) == want
    write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=strict) == want
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind
