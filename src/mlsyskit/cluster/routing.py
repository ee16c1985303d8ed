"""The simulator's placement policies in a real router (``mlsyskit router --policy NAME``).

The router keeps its own counters per backend (requests in flight, outstanding tokens: prompt
characters / 4 + ``max_tokens``); :class:`RoutingPolicy` turns them into the
:class:`~mlsyskit.cluster.policies.InstanceView` list a policy reads, with each backend's
capacity from a replica spec, and returns the backend the policy picks. Backends are
duck-typed (``url``, ``in_flight``, ``outstanding_tokens``), so this module does not import the
serving layer, which sits above it.

A replica spec (``--replica-spec``, one per backend, in order) is ``key=value`` pairs separated
by commas: ``threads`` (its CPU threads: its relative speed), ``kv`` (its KV budget in tokens:
``--num-kv-blocks`` x 16) and ``ctx`` (its ``--max-model-len``), e.g. ``threads=1,kv=4096,ctx=2048``.
What a router cannot do that the simulator does: move a running request to another replica
(``predict`` places by its prediction but does not migrate), and see output lengths it is not
told (``oracle`` reads ``max_tokens`` as the true length). ``predict`` learns online as in the
simulator: each answer's ``usage.completion_tokens`` (or, in a stream without usage, its count
of content chunks, one token each) goes to :meth:`RoutingPolicy.finished`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlsyskit.cluster.policies import POLICIES, InstanceView, RequestInfo, make_policy
from mlsyskit.errors import UserError

UNBOUNDED = 1 << 40  # a replica with no declared KV budget or context: never the limit


@dataclass(frozen=True)
class ReplicaSpec:
    threads: float = 1.0
    kv_tokens: int = UNBOUNDED
    max_model_len: int = UNBOUNDED


def parse_replica_spec(text: str) -> ReplicaSpec:
    """``threads=2,kv=8192,ctx=2048`` (any subset) -> ReplicaSpec; UserError on anything else."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in ("threads", "kv", "ctx"):
            raise UserError(f"--replica-spec {text!r}: expected threads=N,kv=TOKENS,ctx=TOKENS, got {part!r}")
        try:
            v = float(val)
        except ValueError:
            raise UserError(f"--replica-spec {text!r}: {key} must be a number, got {val!r}") from None
        if v <= 0:
            raise UserError(f"--replica-spec {text!r}: {key} must be positive")
        values[key] = v
    return ReplicaSpec(threads=values.get("threads", 1.0), kv_tokens=int(values.get("kv", UNBOUNDED)),
                       max_model_len=int(values.get("ctx", UNBOUNDED)))


class RoutingPolicy:
    """A policy of :mod:`mlsyskit.cluster.policies` choosing among a router's backends."""

    def __init__(self, name: str, specs: dict[str, ReplicaSpec] | None = None, seed: int = 0, **options: Any) -> None:
        if name not in POLICIES:
            raise UserError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")
        self.name = name
        self.policy = make_policy(name, seed, **options)
        self.specs = dict(specs or {})
        self._ids = itertools.count()
        self.learned = 0  # answers whose output length was passed to the policy

    def request(self, prompt_tokens: int, max_tokens: int | None) -> RequestInfo:
        """The request as the policy sees it (the oracle reads ``max_tokens`` as the true length)."""
        out = max_tokens if self.policy.uses_true_lengths else None
        return RequestInfo(next(self._ids), max(1, prompt_tokens), max_tokens, out)

    def views(self, backends: Sequence[Any]) -> list[InstanceView]:
        views = []
        for b in backends:
            s = self.specs.get(b.url.rstrip("/"), ReplicaSpec())
            views.append(InstanceView(
                name=b.url, kv_tokens=s.kv_tokens, max_model_len=s.max_model_len, decode_tok_s=s.threads,
                throughput_tok_s=s.threads, in_flight=b.in_flight, outstanding_tokens=b.outstanding_tokens,
                reserved_tokens=b.outstanding_tokens, outstanding_true=b.outstanding_tokens,
            ))
        return views

    def pick(self, backends: Sequence[Any], req: RequestInfo) -> Any | None:
        """The backend the policy chooses for ``req``, or None when none can take it."""
        if not backends:
            return None
        i = self.policy.choose(req, self.views(backends))
        return None if i is None else backends[i]

    def finished(self, req: RequestInfo, output_tokens: int) -> None:
        """Tell a learning policy (``predict``) how many tokens the request produced."""
        self.learned += 1
        self.policy.on_finish(req, output_tokens)

    def describe(self) -> dict[str, Any]:
        """The policy as /health shows it: its name, the answers it learned from and, for
        ``predict``, its current prediction of an output length (all prompt lengths pooled)."""
        out: dict[str, Any] = {"name": self.name, "learned_from": self.learned}
        predictor = getattr(self.policy, "predictor", None)
        if predictor is not None:
            out["predicted_output_tokens"] = predictor.predict(1 << 20)  # a bucket never seen: the pooled window
        return out


def completion_tokens(body: bytes) -> int | None:
    """``usage.completion_tokens`` of an OpenAI JSON answer, None when it has none."""
    try:
        usage = json.loads(body).get("usage") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    n = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and n >= 0 else None


class StreamTokens:
    """The output length of an OpenAI SSE stream, fed its bytes as they pass: the usage chunk's
    ``completion_tokens`` when the stream has one, else one token per chunk with content."""

    def __init__(self) -> None:
        self._buf = b""
        self.chunks = 0
        self.usage: int | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        *events, self._buf = self._buf.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                try:
                    obj = json.loads(line[5:])
                except (ValueError, UnicodeDecodeError):
                    continue
                if not isinstance(obj, dict):
                    continue
                n = (obj.get("usage") or {}).get("completion_tokens") if isinstance(obj.get("usage"), dict) else None
                if isinstance(n, int):
                    self.usage = n
                for c in obj.get("choices") or []:
                    if isinstance(c, dict) and ((c.get("delta") or {}).get("content") or c.get("text")):
                        self.chunks += 1

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks


def request_tokens(body: Any) -> tuple[int, int | None]:
    """(prompt tokens, max_tokens) of an OpenAI request body, as the router estimates them:
    ~4 characters a token (token-id prompts count one each)."""
    if not isinstance(body, dict):
        return 1, None
    chars = 0
    ids = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        for p in prompt:
            if isinstance(p, str):
                chars += len(p)
            elif isinstance(p, list):
                ids += len(p)
            else:
                ids += 1
    for m in body.get("messages") or [] if isinstance(body.get("messages"), list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if isinstance(body.get("query"), str):
        chars += len(body["query"]) + 2000  # RAG prompts carry the retrieved documents
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    return chars // 4 + ids + 1, mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else None


def build_routing_policy(name: str | None, backends: Sequence[str], spec_texts: Sequence[str] | None) -> RoutingPolicy | None:
    """The router's policy from its flags: None for the router's own least-outstanding-tokens
    rule (``--policy`` not given and no replica specs)."""
    specs: dict[str, ReplicaSpec] = {}
    if spec_texts:
        if len(spec_texts) != len(backends):
            raise UserError(f"--replica-spec: give one per backend ({len(backends)}), got {len(spec_texts)}")
        specs = {url.rstrip("/"): parse_replica_spec(t) for url, t in zip(backends, spec_texts, strict=True)}
    if name is None:
        if not specs:
            return None
        name = "lot"
    return RoutingPolicy(name, specs)
