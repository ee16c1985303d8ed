"""Back ends: numpy (the baseline), torch (the default, BLAS on CPU), triton (GPU kernels).

`get_backend(name)` imports a back end on first use, so importing the package stays light
and a missing Triton only matters to whoever asks for it.
"""

from __future__ import annotations

from mlsyskit.vector._validate import check_backend
from mlsyskit.vector.backends.base import Backend

_INSTANCES: dict[str, Backend] = {}


def get_backend(name: str = "torch") -> Backend:
    """The back end called `name` (numpy, torch or triton); UserError for anything else."""
    name = check_backend(name)
    if name not in _INSTANCES:
        if name == "numpy":
            from mlsyskit.vector.backends.numpy_backend import NumpyBackend

            _INSTANCES[name] = NumpyBackend()
        elif name == "torch":
            from mlsyskit.vector.backends.torch_backend import TorchBackend

            _INSTANCES[name] = TorchBackend()
        else:
            from mlsyskit.vector.backends.triton_backend import TritonBackend

            _INSTANCES[name] = TritonBackend()
    return _INSTANCES[name]


__all__ = ["Backend", "get_backend"]
