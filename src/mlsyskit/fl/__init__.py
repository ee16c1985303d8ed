"""Federated learning (McMahan et al. 2017 and successors): one round loop, simulated in one
process or deployed over gRPC (`mlsyskit.fl.grpc_server`, `mlsyskit.fl.grpc_client`) or
torch.distributed (`mlsyskit.fl.collective`), with secure aggregation (`mlsyskit.fl.secagg`),
DP-FedAvg (`mlsyskit.fl.privacy`) and int8 updates (`mlsyskit.fl.compress`).

Names are imported on first use, so importing the package (as ``mlsyskit --help`` does)
does not load torch.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "ATTACKS": "mlsyskit.fl.config",
    "FLConfig": "mlsyskit.fl.config",
    "resume": "mlsyskit.fl.simulation",
    "run": "mlsyskit.fl.simulation",
    "STRATEGIES": "mlsyskit.fl.strategies",
    "Strategy": "mlsyskit.fl.strategies",
    "StrategyOptions": "mlsyskit.fl.strategies",
    "make_strategy": "mlsyskit.fl.strategies",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
