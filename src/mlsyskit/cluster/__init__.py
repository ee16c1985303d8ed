"""Scheduling LLM requests on a heterogeneous GPU cluster: a discrete-event simulator with a
roofline cost model, workloads, pluggable placement policies, a report and a calibration
against the project's own engine.

``from mlsyskit.cluster import load_spec, build_workload, simulate, make_policy, summarize``.
Names are imported on first use (``mlsyskit --help`` imports ``mlsyskit.cluster.cli`` only).
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "load_spec": "mlsyskit.cluster.spec",
    "spec_from_dict": "mlsyskit.cluster.spec",
    "Spec": "mlsyskit.cluster.spec",
    "ModelSpec": "mlsyskit.cluster.model",
    "model_from_hf_config": "mlsyskit.cluster.model",
    "model_from_gguf": "mlsyskit.cluster.model",
    "InstanceCost": "mlsyskit.cluster.cost",
    "CostParams": "mlsyskit.cluster.cost",
    "Workload": "mlsyskit.cluster.workload",
    "build_workload": "mlsyskit.cluster.workload",
    "load_trace": "mlsyskit.cluster.workload",
    "simulate": "mlsyskit.cluster.sim",
    "SimResult": "mlsyskit.cluster.sim",
    "POLICIES": "mlsyskit.cluster.policies",
    "make_policy": "mlsyskit.cluster.policies",
    "Policy": "mlsyskit.cluster.policies",
    "InstanceView": "mlsyskit.cluster.policies",
    "RequestInfo": "mlsyskit.cluster.policies",
    "Ledger": "mlsyskit.cluster.policies",
    "summarize": "mlsyskit.cluster.metrics",
    "local_cluster": "mlsyskit.cluster.local",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
