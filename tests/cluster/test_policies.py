"""Each policy's choices on small hand-built scenarios, the ledger and the output predictor."""

from __future__ import annotations

import pytest

from mlsyskit.cluster.policies import (
    POLICIES,
    InstanceView,
    Ledger,
    OutputLengthPredictor,
    RequestInfo,
    classify,
    eligible,
    make_policy,
)
from mlsyskit.errors import UserError


def cluster() -> list[InstanceView]:
    """Three small instances (10k KV tokens, context 10k) and one large (146k, context 32k)
    that drains twice as fast."""
    views = [InstanceView(f"s{i}", kv_tokens=10_000, max_model_len=10_000, throughput_tok_s=1000.0) for i in range(3)]
    views.append(InstanceView("big", kv_tokens=146_000, max_model_len=32_768, throughput_tok_s=2000.0))
    classify(views)
    return views


def req(i: int, prompt: int, max_tokens: int | None = None, output: int | None = None) -> RequestInfo:
    return RequestInfo(i, prompt, max_tokens, output)


def test_classify_groups_by_kv_capacity() -> None:
    views = cluster()
    assert [v.group for v in views] == [0, 0, 0, 1]


def test_eligible_filters_by_context() -> None:
    views = cluster()
    assert eligible(req(0, 100, 200), views) == [0, 1, 2, 3]
    assert eligible(req(0, 9000, 2000), views) == [3]  # 11k tokens fit only the big context
    assert eligible(req(0, 40_000), views) == []


def test_round_robin_cycles_and_skips_what_does_not_fit() -> None:
    p, views = make_policy("round-robin"), cluster()
    assert [p.choose(req(i, 10, 10), views) for i in range(5)] == [0, 1, 2, 3, 0]
    assert p.choose(req(9, 9000, 2000), views) == 3  # s1..s2 skipped
    assert p.choose(req(10, 10, 10), views) == 0
    assert p.choose(req(11, 40_000), views) is None


def test_random_is_seeded_and_eligible_only() -> None:
    def picks(seed: int) -> list[int | None]:
        p, views = make_policy("random", seed=seed), cluster()
        return [p.choose(req(i, 10, 10), views) for i in range(20)]

    a = picks(1)
    assert a == picks(1) and a != picks(2)
    assert set(a) <= {0, 1, 2, 3} and len(set(a)) >= 3
    p = make_policy("random", seed=1)
    assert all(p.choose(req(i, 9000, 2000), cluster()) == 3 for i in range(10))


def test_jsq_and_lot() -> None:
    views = cluster()
    views[0].in_flight, views[1].in_flight, views[2].in_flight, views[3].in_flight = 3, 1, 2, 1
    views[0].outstanding_tokens, views[1].outstanding_tokens, views[2].outstanding_tokens, views[3].outstanding_tokens = 100, 5000, 300, 5000
    assert make_policy("jsq").choose(req(0, 10), views) == 1  # fewest in flight (ties: fewer tokens, then index)
    assert make_policy("lot").choose(req(0, 10), views) == 0  # least outstanding tokens
    # ties on tokens go to fewer in flight; the estimate is prompt + max_tokens (128 when not given)
    views[0].outstanding_tokens = views[2].outstanding_tokens = 300
    assert make_policy("lot").choose(req(0, 10), views) == 2
    lot = make_policy("lot")
    assert lot.estimate(req(0, 10, 50)) == 60 and lot.estimate(req(0, 10)) == 138


def test_length_class_places_by_total_length() -> None:
    p = make_policy("length-class", short_max=1024, long_min=4096)
    views = cluster()
    views[3].outstanding_tokens = 0
    views[0].outstanding_tokens, views[1].outstanding_tokens, views[2].outstanding_tokens = 500, 100, 300
    assert p.choose(req(0, 200, 300), views) == 1  # short: the small instances, least outstanding
    assert p.choose(req(1, 200, 5000), views) == 3  # long (by output): the large one
    assert p.choose(req(2, 5000, 100), views) == 3  # long (by prompt)
    assert p.choose(req(3, 1500, 500), views) == 3  # medium: anywhere; the big one has least outstanding
    views[3].outstanding_tokens = 10_000
    assert p.choose(req(4, 1500, 500), views) == 1
    # medium, by drain time: the big one drains twice as fast, so 150 tokens there (75 ms of
    # work) beat 100 on s1 (100 ms): least outstanding tokens alone would pick s1
    views[3].outstanding_tokens = 150
    assert p.choose(req(5, 1500, 500), views) == 3
    views[3].outstanding_tokens = 250  # 125 ms: now s1
    assert p.choose(req(6, 1500, 500), views) == 1


def test_best_fit_takes_the_tightest_instance_with_room() -> None:
    p, views = make_policy("best-fit"), cluster()
    views[0].reserved_tokens, views[1].reserved_tokens, views[2].reserved_tokens = 9000, 7000, 2000
    assert p.choose(req(0, 500, 400), views) == 0  # 900 tokens: s0 has 1000 free, the tightest fit
    assert p.choose(req(1, 1500, 500), views) == 1  # 2000: s1 (3000 free)
    assert p.choose(req(2, 9000, 500), views) == 3  # 9500: only the big one has room
    for v in views:
        v.reserved_tokens = v.kv_tokens
    views[2].reserved_tokens = 9500  # 500 free: 5 %
    views[3].reserved_tokens = 140_000  # 6000 free: 4 %, but 9000 tokens would not fit either
    assert p.choose(req(3, 10_000, 400), views) == 3  # only the big context holds it
    assert p.choose(req(4, 6000, 1000), views) == 2  # none has room: the most free relative to its size


def test_oracle_sees_the_true_length_and_drain_time() -> None:
    p, views = make_policy("oracle", short_max=1024, long_min=4096), cluster()
    assert p.uses_true_lengths
    # no max_tokens (unknown to a router), but the true output is long: the large instance
    assert p.choose(req(0, 100, None, 6000), views) == 3
    assert p.estimate(req(0, 100, None, 6000)) == 6100
    # medium: where the true work drains soonest (the big one is twice as fast)
    views[0].outstanding_true = 0
    views[3].outstanding_true = 1000
    assert p.choose(req(1, 1500, None, 500), views) == 3  # (1000 + 2000) / 2000 < 2000 / 1000
    views[3].outstanding_true = 4000
    assert p.choose(req(2, 1500, None, 500), views) == 0


def test_ledger_counts() -> None:
    views = cluster()
    led = Ledger(views)
    r = req(7, 100, 50, 80)
    led.dispatch(r, 2, 150)
    assert (views[2].in_flight, views[2].outstanding_tokens, views[2].reserved_tokens, views[2].outstanding_true) == (1, 150, 150, 180)
    assert led.where(7) == 2 and led.finish(7) == 2 and led.finish(7) is None
    assert (views[2].in_flight, views[2].outstanding_tokens, views[2].outstanding_true) == (0, 0, 0)


def test_output_length_predictor() -> None:
    pr = OutputLengthPredictor(quantile=0.5, window=10, min_samples=3)
    assert pr.predict(100) == 128  # nothing seen: the default
    for out in (10, 20, 30):
        pr.observe(100, out)  # bucket 6 (64..127)
    assert pr.predict(100) == 20 and pr.predict(70) == 20
    assert pr.predict(1000) == 20  # unseen bucket: all outputs
    for out in range(100, 120):
        pr.observe(100, out)  # the window keeps the last 10
    assert pr.predict(100) == 114
    # decision point: 8 short outputs (10) and 2 long (1000) -> after >= 10 tokens... half of
    # those that get past g are long when at most 4 remain: g = the 7th smallest
    pr2 = OutputLengthPredictor(quantile=0.5, window=100, min_samples=1)
    for out in [10, 11, 12, 13, 14, 15, 16, 17, 1000, 1200]:
        pr2.observe(50, out)
    assert pr2.decision_point(50, 900) == 16
    assert pr2.decision_point(50, 5000) == 5000  # nothing that long seen
    with pytest.raises(UserError):
        OutputLengthPredictor(quantile=0)


def test_predict_places_on_prediction_and_moves_long_requests() -> None:
    p, views = make_policy("predict", short_max=1024, long_min=4096), cluster()
    for _ in range(50):
        p.on_finish(req(-1, 200), 150)  # short prompts have given short answers
    assert p.expected_output(req(0, 200)) == 150
    i = p.choose(req(0, 200), views)
    assert i in (0, 1, 2)
    w = p.watch(req(0, 200), i, views)
    assert w is not None and 1 <= w <= 4096 - 200
    assert p.on_watch(req(0, 200), w, i, views) == 3  # moved to the large instance
    assert p.watch(req(1, 200), 3, views) is None  # already on the largest: nothing to watch
    p.on_finish(req(0, 200), 5000)
    assert p.mispredictions == 1 and p.long_missed == 1
    assert make_policy("predict", recover=False).watch(req(2, 200), 0, views) is None


def test_registry() -> None:
    assert set(POLICIES) == {"random", "round-robin", "jsq", "lot", "length-class", "best-fit", "oracle", "predict"}
    with pytest.raises(UserError, match="unknown policy"):
        make_policy("fastest")
