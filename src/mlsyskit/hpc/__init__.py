"""MPI programs (a Taylor series over ranks, federated logistic regression with masking) and
measured studies (BLAS roofline, activation functions, Triton image kernels).

Names are imported on first use, so importing the package (as ``mlsyskit --help`` does)
does not load numpy, torch or MPI.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "TaylorConfig": "mlsyskit.hpc.taylor",
    "run_taylor": "mlsyskit.hpc.taylor",
    "partial_sum": "mlsyskit.hpc.taylor",
    "LogRegConfig": "mlsyskit.hpc.logreg",
    "run_logreg": "mlsyskit.hpc.logreg",
    "BlasConfig": "mlsyskit.hpc.blas",
    "run_blas": "mlsyskit.hpc.blas",
    "ActivationConfig": "mlsyskit.hpc.activations",
    "run_activations": "mlsyskit.hpc.activations",
    "grayscale": "mlsyskit.hpc.kernels",
    "conv2d_relu": "mlsyskit.hpc.kernels",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
