"""The simulation spec: cluster, model, engine settings, cost model, workload, SLO, in one TOML.

```toml
name = "q11"

[model]                    # by hand, or config = "config.json", or gguf = "model.gguf"
n_layers = 28
hidden = 3072
...

[gpu.gpu8]                 # GPU kinds: memory, peak dense FLOP/s, memory bandwidth
memory_gib = 8
tflops = 40
bandwidth_gb_s = 448

[[node]]
name = "c4"
gpus = ["gpu12", "gpu12"]
link = { bandwidth_gb_s = 100, latency_us = 5 }   # between this node's GPUs (NVLink)

[network]                  # between nodes; requests enter at `entry`
bandwidth_gb_s = 0.125
latency_us = 200
entry = "c1"

[[instance]]               # optional (default: one instance per GPU); several GPUs of one
gpus = ["c4:0", "c4:1"]    # node make one tensor-parallel instance

[engine]                   # the engine's knobs, for every instance (an [[instance]] may override)
block_size = 16
max_num_seqs = 64
max_num_batched_tokens = 512
gpu_memory_utilization = 0.92
reserve_gib = 0.25         # activations and runtime, besides weights and KV
admission = "chunk"        # or "whole" (see EngineSettings)

[cost]                     # see mlsyskit.cluster.cost
mfu = 0.5
mbu = 0.8
step_overhead_ms = 2

[workload]                 # see mlsyskit.cluster.workload
[slo]
ttft_s = 2.0
tpot_s = 0.1

[policy]                   # options of the policies, e.g. long_min, short_max, quantile
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsyskit.cluster.cost import CostParams, InstanceCost, Link
from mlsyskit.cluster.model import ModelSpec, model_from_table
from mlsyskit.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    kind: str
    memory_bytes: float
    flops: float  # peak dense FLOP/s at the model's dtype
    bandwidth: float  # bytes/s


@dataclass
class EngineSettings:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    gpu_memory_utilization: float = 0.92
    reserve_gib: float = 0.25
    max_model_len: int | None = None  # default: the model's context, cut to what the KV holds
    num_kv_blocks: int | None = None  # default: what the memory left after the weights holds
    # "chunk": a waiting request is admitted when its next chunk fits (mlsyskit's engine);
    # "whole": only when its whole remaining prompt fits with 1 % of the pool to spare (vLLM V0)
    admission: str = "chunk"


@dataclass
class InstanceSpec:
    """One engine instance: its GPUs, its KV pool and its cost model."""

    name: str
    node: str
    gpus: list[GPU]
    engine: EngineSettings
    num_blocks: int
    max_model_len: int
    cost: InstanceCost

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.engine.block_size

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "node": self.node, "tp": self.tp, "gpus": [g.kind for g in self.gpus],
            "kv_blocks": self.num_blocks, "kv_tokens": self.kv_tokens, "max_model_len": self.max_model_len,
            "block_size": self.engine.block_size, "max_num_seqs": self.engine.max_num_seqs,
            "max_num_batched_tokens": self.engine.max_num_batched_tokens,
            "decode_ms_batch1": round(1000 * self.cost.decode_run_time(1, 512, 1), 3),
        }


@dataclass
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1


@dataclass
class Spec:
    name: str
    path: Path | None
    model: ModelSpec
    instances: list[InstanceSpec]
    network: Link
    entry: str
    links: dict[str, Link]  # node -> its intra-node link
    cost: CostParams
    workload: dict[str, Any]
    slo: SLO
    policy_options: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def link_between(self, a: str, b: str) -> Link | None:
        """The link a transfer from node ``a`` to node ``b`` crosses (None: same place)."""
        if a == b:
            return None
        return self.network


# ------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------


def _num(table: dict[str, Any], key: str, where: str, default: float | None = None, positive: bool = True) -> float:
    v = table.get(key, default)
    if v is None:
        raise UserError(f"{where}: missing {key}")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise UserError(f"{where}: {key} must be a number, got {v!r}")
    if positive and v <= 0:
        raise UserError(f"{where}: {key} must be positive, got {v}")
    if not positive and v < 0:
        raise UserError(f"{where}: {key} must not be negative, got {v}")
    return float(v)


def _check_keys(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _link(table: Any, where: str) -> Link:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table with bandwidth_gb_s and latency_us")
    _check_keys(table, {"bandwidth_gb_s", "latency_us"}, where)
    return Link(_num(table, "bandwidth_gb_s", where) * 1e9, _num(table, "latency_us", where, 0.0, positive=False) * 1e-6)


def _engine(table: dict[str, Any], where: str, base: EngineSettings | None = None) -> EngineSettings:
    known = {"block_size", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "reserve_gib",
             "max_model_len", "num_kv_blocks", "admission"}
    e = EngineSettings(**(base.__dict__ if base else {}))
    for k in known & set(table):
        v = table[k]
        if k == "admission":
            if v not in ("chunk", "whole"):
                raise UserError(f"{where}: admission must be chunk or whole, got {v!r}")
        elif k in ("gpu_memory_utilization", "reserve_gib"):
            v = _num(table, k, where, positive=(k == "gpu_memory_utilization"))
            if k == "gpu_memory_utilization" and v > 1:
                raise UserError(f"{where}: gpu_memory_utilization must be in (0, 1], got {v}")
        elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{where}: {k} must be a positive integer, got {v!r}")
        setattr(e, k, v)
    if e.max_num_seqs > e.max_num_batched_tokens:
        raise UserError(f"{where}: max_num_seqs ({e.max_num_seqs}) must not exceed max_num_batched_tokens "
                        f"({e.max_num_batched_tokens}): every running sequence decodes each step")
    return e


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file (UserError with the file and the key on any problem)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"spec file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read spec file {p}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML ({e})") from e
    try:
        return spec_from_dict(raw, p)
    except UserError as e:
        raise UserError(f"{p}: {e}") from None


def spec_from_dict(raw: dict[str, Any], path: Path | None = None) -> Spec:
    """A spec from the parsed TOML (``path`` resolves relative model files)."""
    _check_keys(raw, {"name", "description", "model", "gpu", "node", "network", "instance", "engine", "cost",
                      "workload", "slo", "policy"}, "spec")
    base_dir = path.parent if path else None
    if not isinstance(raw.get("model"), dict):
        raise UserError("[model] is missing")
    model = model_from_table(raw["model"], base_dir)

    kinds: dict[str, GPU] = {}
    for kind, t in (raw.get("gpu") or {}).items():
        where = f"[gpu.{kind}]"
        if not isinstance(t, dict):
            raise UserError(f"{where} must be a table")
        _check_keys(t, {"memory_gib", "tflops", "bandwidth_gb_s"}, where)
        kinds[kind] = GPU(kind, _num(t, "memory_gib", where) * GIB, _num(t, "tflops", where) * 1e12,
                          _num(t, "bandwidth_gb_s", where) * 1e9)
    if not kinds:
        raise UserError("no GPU kinds: add a [gpu.NAME] table with memory_gib, tflops, bandwidth_gb_s")

    nodes: dict[str, list[GPU]] = {}
    links: dict[str, Link] = {}
    for i, t in enumerate(raw.get("node") or []):
        where = f"[[node]] #{i + 1}"
        _check_keys(t, {"name", "gpus", "link"}, where)
        name = str(t.get("name") or f"node{i}")
        if name in nodes:
            raise UserError(f"{where}: node name {name!r} used twice")
        gpus = t.get("gpus")
        if not isinstance(gpus, list) or not gpus:
            raise UserError(f"{where}: gpus must be a non-empty list of GPU kinds")
        for g in gpus:
            if g not in kinds:
                raise UserError(f"{where}: unknown GPU kind {g!r}; defined: {', '.join(kinds)}")
        nodes[name] = [kinds[g] for g in gpus]
        if "link" in t:
            links[name] = _link(t["link"], f"{where} link")
    if not nodes:
        raise UserError("no nodes: add [[node]] tables")

    net = raw.get("network") or {"bandwidth_gb_s": 1.25, "latency_us": 100}
    entry = str(net.get("entry", next(iter(nodes))))
    if entry not in nodes:
        raise UserError(f"[network] entry {entry!r} is not a node ({', '.join(nodes)})")
    network = _link({k: v for k, v in net.items() if k != "entry"}, "[network]")

    cost_t = raw.get("cost") or {}
    _check_keys(cost_t, {"mfu", "mbu", "step_overhead_ms", "seq_overhead_ms", "token_overhead_us", "kv_overhead_ns"}, "[cost]")
    cost = CostParams(
        mfu=_num(cost_t, "mfu", "[cost]", 0.5), mbu=_num(cost_t, "mbu", "[cost]", 0.8),
        step_overhead_s=_num(cost_t, "step_overhead_ms", "[cost]", 2.0, positive=False) / 1e3,
        seq_overhead_s=_num(cost_t, "seq_overhead_ms", "[cost]", 0.0, positive=False) / 1e3,
        token_overhead_s=_num(cost_t, "token_overhead_us", "[cost]", 0.0, positive=False) / 1e6,
        kv_overhead_s=_num(cost_t, "kv_overhead_ns", "[cost]", 0.0, positive=False) / 1e9,
    )
    if cost.mfu > 1 or cost.mbu > 1:
        raise UserError("[cost] mfu and mbu are fractions of the peak: at most 1")

    engine = _engine(raw.get("engine") or {}, "[engine]")

    inst_tables = raw.get("instance")
    if not inst_tables:
        inst_tables = [{"gpus": [f"{n}:{j}"]} for n, gs in nodes.items() for j in range(len(gs))]
    instances: list[InstanceSpec] = []
    used: set[str] = set()
    for i, t in enumerate(inst_tables):
        where = f"[[instance]] #{i + 1}"
        _check_keys(t, {"name", "gpus", "block_size", "max_num_seqs", "max_num_batched_tokens",
                        "gpu_memory_utilization", "reserve_gib", "max_model_len", "num_kv_blocks", "admission"}, where)
        refs = t.get("gpus")
        if not isinstance(refs, list) or not refs:
            raise UserError(f"{where}: gpus must list GPUs as \"node:index\"")
        gpus: list[GPU] = []
        node = None
        for ref in refs:
            n, _, idx = str(ref).partition(":")
            if n not in nodes or not idx.isdigit() or int(idx) >= len(nodes[n]):
                raise UserError(f"{where}: no GPU {ref!r} (write node:index, e.g. \"{next(iter(nodes))}:0\")")
            if ref in used:
                raise UserError(f"{where}: GPU {ref} belongs to two instances")
            if node is not None and n != node:
                raise UserError(f"{where}: tensor parallelism across nodes is not modelled; keep an instance's GPUs on one node")
            node = n
            used.add(ref)
            gpus.append(nodes[n][int(idx)])
        assert node is not None
        eng = _engine(t, where, engine)
        name = str(t.get("name") or (node if len(nodes[node]) == 1 else f"{node}:" + "+".join(r.partition(":")[2] for r in refs)))
        instances.append(_instance(name, node, gpus, eng, model, cost, links.get(node), where))
    names = [x.name for x in instances]
    if len(set(names)) != len(names):
        raise UserError(f"instance names must differ: {names}")

    slo_t = raw.get("slo") or {}
    _check_keys(slo_t, {"ttft_s", "tpot_s"}, "[slo]")
    slo = SLO(_num(slo_t, "ttft_s", "[slo]", 2.0), _num(slo_t, "tpot_s", "[slo]", 0.1))
    workload = raw.get("workload") or {}
    if not isinstance(workload, dict):
        raise UserError("[workload] must be a table")
    return Spec(
        name=str(raw.get("name") or (path.stem if path else "cluster")), path=path, model=model, instances=instances,
        network=network, entry=entry, links=links, cost=cost, workload=workload, slo=slo,
        policy_options=dict(raw.get("policy") or {}), raw=raw,
    )


def _instance(name: str, node: str, gpus: list[GPU], eng: EngineSettings, model: ModelSpec, cost: CostParams,
              link: Link | None, where: str) -> InstanceSpec:
    tp = len(gpus)
    if tp > 1 and link is None:
        raise UserError(f"{where}: {tp} GPUs in tensor parallel need a link on node {node} (link = {{ bandwidth_gb_s, latency_us }})")
    if model.n_kv_heads % tp and tp % model.n_kv_heads:
        raise UserError(f"{where}: {model.n_kv_heads} KV heads do not split over {tp} GPUs")
    mem = min(g.memory_bytes for g in gpus) * eng.gpu_memory_utilization
    weights = model.weight_bytes / tp
    free = mem - weights - eng.reserve_gib * GIB
    kv_per_gpu = model.kv_bytes_per_token / tp
    blocks = int(free // (kv_per_gpu * eng.block_size)) if free > 0 else 0
    if eng.num_kv_blocks is not None:
        if eng.num_kv_blocks > blocks:
            raise UserError(f"{where}: num_kv_blocks={eng.num_kv_blocks} does not fit: the memory left holds {blocks}")
        blocks = eng.num_kv_blocks
    if blocks < 1:
        raise UserError(
            f"{where}: the model does not fit on {name}: {weights / GIB:.2f} GiB of weights per GPU + "
            f"{eng.reserve_gib} GiB reserve in {mem / GIB:.2f} GiB usable leaves no room for KV"
        )
    mml = min(model.max_context, blocks * eng.block_size)
    if eng.max_model_len is not None:
        if eng.max_model_len > blocks * eng.block_size:
            raise UserError(f"{where}: max_model_len={eng.max_model_len} exceeds the KV pool ({blocks * eng.block_size} tokens)")
        mml = min(eng.max_model_len, model.max_context)
    ic = InstanceCost(model, min(g.flops for g in gpus), min(g.bandwidth for g in gpus), tp, cost, link)
    return InstanceSpec(name, node, gpus, eng, blocks, mml, ic)
