"""The simulator's policies inside the real router: `Router.pick` with `--policy` and replica specs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlsyskit.cluster.routing import (
    ReplicaSpec,
    StreamTokens,
    build_routing_policy,
    completion_tokens,
    parse_replica_spec,
    request_tokens,
)
from mlsyskit.errors import UserError
from mlsyskit.serve.router import Router

SMALL1, SMALL2, BIG = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
SPECS = ["threads=1,kv=4096,ctx=2048", "threads=1,kv=4096,ctx=2048", "threads=2,kv=65536,ctx=8192"]


def router(policy: str | None, specs: list[str] | None = SPECS) -> Router:
    backends = [SMALL1, SMALL2, BIG]
    return Router(backends, policy=build_routing_policy(policy, backends, specs))


def test_replica_specs() -> None:
    assert parse_replica_spec("threads=2,kv=8192,ctx=2048") == ReplicaSpec(2.0, 8192, 2048)
    assert parse_replica_spec("kv=100").threads == 1.0
    for bad in ("threads=0", "gpus=2", "kv=lots", "threads"):
        with pytest.raises(UserError, match="replica-spec"):
            parse_replica_spec(bad)
    assert build_routing_policy(None, [SMALL1], None) is None  # the router's own rule
    assert build_routing_policy(None, [SMALL1], ["kv=10"]).name == "lot"
    with pytest.raises(UserError, match="one per backend"):
        build_routing_policy("lot", [SMALL1, SMALL2], ["kv=10"])
    with pytest.raises(UserError, match="unknown routing policy"):
        build_routing_policy("fastest", [SMALL1], None)


def test_request_tokens_like_the_router_estimate() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert request_tokens(body) == (101, 50)
    assert request_tokens({"prompt": [[1, 2, 3]], "max_tokens": 0}) == (4, None)
    assert request_tokens("not json") == (1, None)


def test_length_class_in_the_router() -> None:
    r = router("length-class")
    pol = r.policy
    r.backends[SMALL1].outstanding_tokens = 500
    long_req = pol.request(prompt_tokens=300, max_tokens=3000)  # 3,300 tokens: only the big context
    assert r.pick(req=long_req).url == BIG
    short = pol.request(prompt_tokens=100, max_tokens=50)
    assert r.pick(req=short).url == SMALL2  # short: a small replica, the one with least outstanding
    r.backends[SMALL2].alive = False
    assert r.pick(req=short).url == SMALL1  # only live backends are candidates
    assert r.pick(exclude={SMALL1}, req=short).url == BIG  # retries exclude the failed one


def test_round_robin_jsq_and_the_default_rule() -> None:
    r = router("round-robin", None)
    req = r.policy.request(10, 10)
    assert [r.pick(req=req).url for _ in range(4)] == [SMALL1, SMALL2, BIG, SMALL1]
    r = router("jsq", None)
    r.backends[SMALL1].in_flight, r.backends[SMALL2].in_flight, r.backends[BIG].in_flight = 3, 1, 2
    assert r.pick(req=r.policy.request(10, 10)).url == SMALL2
    plain = router(None, None)
    assert plain.policy is None
    plain.backends[SMALL1].outstanding_tokens, plain.backends[BIG].outstanding_tokens = 50, 10
    plain.backends[SMALL2].outstanding_tokens = 30
    assert plain.pick().url == BIG  # least outstanding tokens, as before policies


def test_router_cli_rejects_a_bad_policy_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlsyskit", "router", "--backends", SMALL1, "--port", "18000", "--policy", "fastest"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown routing policy" in lines[0]
    proc = subprocess.run([sys.executable, "-m", "mlsyskit", "router", "--backends", SMALL1, SMALL2, "--replica-spec", "kv=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "one per backend" in proc.stderr


def test_output_lengths_read_from_answers() -> None:
    assert completion_tokens(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 12}}') == 12
    assert completion_tokens(b'{"choices": []}') is None and completion_tokens(b"not json") is None
    chunk = 'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n'
    events = "".join(chunk % w for w in ("a", "b", "", "c")) + "data: [DONE]\n\n"
    counter = StreamTokens()
    for i in range(0, len(events), 7):  # bytes arrive cut anywhere
        counter.feed(events[i : i + 7].encode())
    assert counter.tokens == 3  # the empty delta is no token
    counter.feed(b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\n')
    assert counter.tokens == 4  # the usage chunk, when the stream has one, is the count


def test_predict_in_the_router_learns_from_finished_requests() -> None:
    r = router("predict")
    pol = r.policy
    assert pol.describe() == {"name": "predict", "learned_from": 0, "predicted_output_tokens": 128}
    for n in (40, 50, 60, 70, 80, 90, 100, 110, 120):
        req = pol.request(prompt_tokens=100, max_tokens=None)
        r.pick(req=req)
        pol.finished(req, n)
    assert pol.describe()["learned_from"] == 9
    assert pol.policy.expected_output(pol.request(prompt_tokens=100, max_tokens=None)) == 80  # the median
