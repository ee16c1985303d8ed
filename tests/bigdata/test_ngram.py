"""N-gram counts on Spark, Kneser-Ney against NLTK, ARPA read by another library, perplexity."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from mlsyskit.bigdata.ngram import (
    NgramLM,
    counts_from_sentences,
    estimate_kneser_ney,
    kneser_ney_statistics,
    ngram_counts,
    run_ngram,
    statistics_from_counts,
)
from mlsyskit.bigdata.text import BOS, EOS, UNK, read_sentences, tokenize
from mlsyskit.errors import UserError

from .conftest import ENGLISH, PERSIAN


def test_tokenize_english_and_persian() -> None:
    assert tokenize("Don't let the well-beloved dog o'er the mat.") == [
        "Don't", "let", "the", "well-beloved", "dog", "o'er", "the", "mat", "."]
    assert tokenize("Don't GO", lowercase=True) == ["don't", "go"]
    # ZWNJ stays inside a word, Persian punctuation is its own token, tatweel is dropped
    assert tokenize("من می\u200cخواهم به خانه بروم، امّا باران می\u200cبارد؟") == [
        "من", "می\u200cخواهم", "به", "خانه", "بروم", "،", "امّا", "باران", "می\u200cبارد", "؟"]
    assert tokenize("«کتاب\u200cها» ۱۲۳ کشـــیده") == ["«", "کتاب\u200cها", "»", "۱۲۳", "کشیده"]
    assert tokenize(" \t\u200c ") == []


def test_spark_tokens_and_counts_equal_the_single_process(spark, corpus_dir: Path) -> None:
    """Spark's tokenizer (regexp on the JVM) and counts equal the Python ones, Persian too."""
    path = str(corpus_dir / "persian.txt")
    sentences = read_sentences(spark, path)
    spark_tokens = [list(r.tokens) for r in sentences.collect()]
    python_tokens = [t for t in (tokenize(line) for line in PERSIAN.splitlines()) if t]
    assert spark_tokens == python_tokens and "می\u200cخواهم" in spark_tokens[0]
    rows = ngram_counts(sentences, 3).collect()
    spark_counts = {k: {r["ngram"]: r["count"] for r in rows if r["order"] == k} for k in (1, 2, 3)}
    assert spark_counts == counts_from_sentences(python_tokens, 3)
    # <s> is context only: never counted as the last token of an n-gram
    assert BOS not in spark_counts[1] and f"{BOS} {BOS}" not in spark_counts[2]
    assert spark_counts[3][f"{BOS} {BOS} من"] == 1 and spark_counts[1][EOS] == len(python_tokens)


def _nltk_model(sentences: list[list[str]], order: int, discount: float):
    from nltk.lm import KneserNeyInterpolated

    # the same n-grams as ours (none ending in <s>), counted and smoothed by NLTK
    padded = [[BOS] * (order - 1) + s + [EOS] for s in sentences]
    grams = [[tuple(p[i : i + k]) for k in range(1, order + 1) for i in range(max(0, order - k), len(p) - k + 1)] for p in padded]
    ref = KneserNeyInterpolated(order, discount=discount)
    ref.fit(grams, [t for p in padded for t in p])
    return ref


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_equals_nltk(spark, corpus_dir: Path, order: int) -> None:
    """Every p(w | h), h any context of the model (or none), w any word: the same as NLTK's
    KneserNeyInterpolated (same discount, NLTK's unigram) to 1e-9. Order 3 from Spark's counts."""
    sentences = [t for t in (tokenize(line, lowercase=True) for line in ENGLISH.splitlines()) if t]
    if order == 3:
        stats = kneser_ney_statistics(ngram_counts(read_sentences(spark, str(corpus_dir / "english.txt"), lowercase=True), 3), 3)
    else:
        stats = statistics_from_counts(counts_from_sentences(sentences, order), order)
    lm = estimate_kneser_ney(stats, discount=0.1, unigram_discount=0.0)
    ref = _nltk_model(sentences, order, 0.1)
    words = [w for w in lm.log_probs[1] if w != UNK]
    contexts = {()} | {tuple(g.split()) for k in range(1, order) for g in lm.log_probs[k]}
    worst = max(abs(lm.prob(w, c) - ref.unmasked_score(w, c)) for c in contexts for w in words)
    assert worst < 1e-9
    assert len(contexts) > 20


def test_standard_discounts_give_a_normalized_model(spark, corpus_dir: Path) -> None:
    stats = statistics_from_counts(counts_from_sentences([tokenize(x) for x in ENGLISH.splitlines()], 3), 3)
    lm = estimate_kneser_ney(stats)
    n1, n2 = stats.count_of_counts[3]
    assert lm.discounts[3] == pytest.approx(n1 / (n1 + 2 * n2))
    for context in [("the", "cat"), ("on", "the"), (BOS, BOS), ("never", "seen")]:
        total = sum(lm.distribution(context).values())
        assert total == pytest.approx(1.0, abs=1e-9)
    assert lm.prob("zebra", ("the",)) > 0  # unseen words keep probability via <unk>


def test_arpa_file_is_read_by_another_library(tmp_path: Path) -> None:
    """The `arpa` package (an independent ARPA reader) gives our probabilities back."""
    import arpa

    sentences = [tokenize(x) for x in PERSIAN.splitlines() if tokenize(x)]
    lm = estimate_kneser_ney(statistics_from_counts(counts_from_sentences(sentences, 3), 3))
    path = lm.write_arpa(tmp_path / "fa.arpa")
    theirs = arpa.loadf(str(path))[0]
    ours = NgramLM.read_arpa(path)
    queries = [("من", "می\u200cخواهم", "به"), ("باران", "می\u200cبارد"), ("کتاب\u200cها", "من", "خانه"), ("۱۲۳",)]
    for q in queries:
        expected = lm.logprob(q[-1], q[:-1])
        assert theirs.log_p(" ".join(q)) == pytest.approx(expected, abs=1e-8)
        assert ours.logprob(q[-1], q[:-1]) == pytest.approx(expected, abs=1e-8)
    assert theirs.order() == 3


def test_run_ngram_perplexity_and_generation(spark, corpus_dir: Path, tmp_path: Path) -> None:
    train = corpus_dir / "english.txt"
    held_out = tmp_path / "eval.txt"
    held_out.write_text("The cat sat on the log.\nA zebra met the dog!\n", encoding="utf-8")
    summary = run_ngram(spark, str(train), 3, tmp_path / "out", eval_path=str(held_out), samples=2, seed=3)
    assert {"order", "vocab", "train_tokens", "eval_tokens", "perplexity", "arpa"} <= set(summary)
    assert summary["train_tokens"] == sum(len(tokenize(x)) for x in ENGLISH.splitlines())
    assert summary["eval_tokens"] == 13 and summary["eval_oov"] == 1  # "zebra"
    lm = NgramLM.read_arpa(summary["arpa"])
    sentences = [tokenize(x) for x in held_out.read_text().splitlines()]
    logp = sum(lm.sentence_logprob(s)[0] for s in sentences)
    assert summary["perplexity"] == pytest.approx(10 ** (-logp / 15), rel=1e-6)  # 13 words + 2 </s>
    assert 1 < summary["perplexity"] < summary["vocab"] + 3
    # generation samples real continuations: every drawn word is in the vocabulary
    for sample in summary["samples"]:
        assert set(sample.split()) <= set(lm.log_probs[1]) - {BOS, UNK}
    again = estimate_kneser_ney(statistics_from_counts(counts_from_sentences([tokenize(x) for x in ENGLISH.splitlines()], 3), 3))
    first = again.generate(random.Random(5), 8, prompt=["the"])
    assert first == again.generate(random.Random(5), 8, prompt=["the"])
    assert all(math.isfinite(again.logprob(w, ["the"])) for w in first)


def test_empty_corpus_is_a_user_error(spark, tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\t\n", encoding="utf-8")
    with pytest.raises(UserError, match="no token"):
        run_ngram(spark, str(blank), 2, tmp_path / "out")
    with pytest.raises(UserError, match="does not exist|no such"):
        run_ngram(spark, str(tmp_path / "missing.txt"), 2, tmp_path / "out2")
