import ctypes.util

import pytest

from mlsyskit.runtime import keep_freed_memory


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_keep_freed_memory_is_accepted_by_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent (cached)
