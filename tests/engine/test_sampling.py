"""The sampler: filters, greedy, and that random draws follow the filtered distribution."""

from __future__ import annotations

import pytest
import torch

from mlsyskit.engine.sampling import SamplingParams, filter_logits, sample
from mlsyskit.errors import UserError


def test_top_k_and_top_p_keep_exactly_the_expected_tokens() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0]).log()  # probs 0.1 0.4 0.3 0.2 0.0
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=1.0)) == [1, 2]
    # nucleus: 0.4 + 0.3 = 0.7 >= 0.65, so tokens 1 and 2; at 0.75 token 3 joins
    assert sorted(kept(filter_logits(logits, 1.0, top_k=0, top_p=0.65))) == [1, 2]
    assert sorted(kept(filter_logits(logits, 1.0, top_k=0, top_p=0.75))) == [1, 2, 3]
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=0.01)) == [1]  # never empty
    scaled = filter_logits(torch.tensor([0.0, 2.0]), 0.5, 0, 1.0)
    torch.testing.assert_close(scaled, torch.tensor([0.0, 4.0]))


def test_samples_follow_the_distribution_and_greedy_is_argmax() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(4000, 3).clone()
    params = [SamplingParams(temperature=1.0)] * 4000
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor(sample(logits, params, [gen] * 4000))
    freq = torch.bincount(draws, minlength=3) / 4000
    assert (freq - probs).abs().max() < 0.03, freq
    greedy = sample(logits[:3], [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert greedy == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs: dict, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        SamplingParams(**kwargs)


def test_a_single_stop_string_is_accepted() -> None:
    assert SamplingParams(stop="\n").stop == ["\n"]
