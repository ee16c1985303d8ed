"""Word2Vec: MLlib skip-gram and our CBOW (data-parallel and in one process) learn real
co-occurrence structure; the evaluation helpers are right."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mlsyskit.bigdata.text import read_sentences
from mlsyskit.bigdata.word2vec import (
    CBOWConfig,
    WordVectors,
    analogy_questions,
    evaluate_analogies,
    evaluate_similarity,
    read_similarity,
    spearman,
    train_cbow,
    train_skipgram,
)

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat"]
TOOLS = ["hammer", "saw", "drill", "wrench", "pliers", "chisel"]


@pytest.fixture(scope="module")
def topic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentences about one topic each: animals appear with animals, tools with tools."""
    rng = random.Random(0)
    lines = []
    for i in range(1200):
        topic = ANIMALS if i % 2 else TOOLS
        words = [rng.choice(topic) for _ in range(rng.randint(5, 8))]
        words.insert(rng.randrange(len(words)), "the")
        lines.append(" ".join(words))
    path = tmp_path_factory.mktemp("w2v") / "topics.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _topic_margin(wv: WordVectors) -> float:
    """Mean cosine within a topic minus mean cosine across topics."""
    same = [wv.similarity(a, b) for g in (ANIMALS, TOOLS) for a in g for b in g if a < b]
    cross = [wv.similarity(a, b) for a in ANIMALS for b in TOOLS]
    return float(np.mean(same) - np.mean(cross))


def _neighbours_in_topic(wv: WordVectors) -> float:
    hits = []
    for group in (ANIMALS, TOOLS):
        for w in group:
            hits += [n in group for n, _ in wv.neighbors(w, 3)]
    return float(np.mean(hits))


def test_cbow_and_skipgram_learn_the_topics(spark, topic_corpus: Path) -> None:
    sentences = read_sentences(spark, str(topic_corpus)).cache()
    cfg = CBOWConfig(dim=16, window=3, epochs=3, seed=3, sample=0)
    parallel, info = train_cbow(spark, sentences, min_count=1, config=cfg)
    single, info1 = train_cbow(spark, sentences, min_count=1, config=cfg, single_process=True)
    skipgram, info_sg = train_skipgram(spark, sentences, dim=16, window=3, min_count=1, epochs=2, seed=3)
    sentences.unpersist()
    assert info["partitions"] == 2 and info1["partitions"] == 1 and info["single_process"] is False
    assert info["vocab"] == len(ANIMALS) + len(TOOLS) + 1 and info["words_per_second"] > 0
    for wv in (parallel, single, skipgram):
        assert _topic_margin(wv) > 0.3, _topic_margin(wv)
        assert _neighbours_in_topic(wv) == 1.0
    # the two CBOW runs differ (averaged copies vs one copy) but learn the same structure
    assert not np.allclose(parallel.vectors, single.vectors)


def test_neighbours_and_analogies_are_exact(tmp_path: Path) -> None:
    """3CosAdd through mlsyskit.vector equals a brute-force numpy answer; Spearman as scipy."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)] + ["king", "queen", "man", "woman"]
    vectors = rng.normal(size=(len(words), 8)).astype(np.float32)
    base = rng.normal(size=8).astype(np.float32)
    gender = rng.normal(size=8).astype(np.float32) * 3
    vectors[-4:] = [base + 5, base + 5 + gender, base - 5, base - 5 + gender]
    wv = WordVectors(words, vectors)
    result = evaluate_analogies(wv, analogy_questions({"g": [("king", "queen"), ("man", "woman")]}))
    assert result["covered"] == 2 and result["accuracy"] == 1.0
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit[words.index("w3")]
    sims[words.index("w3")] = -np.inf
    assert [n for n, _ in wv.neighbors("w3", 5)] == [words[i] for i in np.argsort(-sims)[:5]]
    from scipy.stats import spearmanr

    x, y = rng.normal(size=30), rng.normal(size=30)
    y[:5] = y[0]  # ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    pairs_file = tmp_path / "sim.tsv"
    pairs_file.write_text("Word 1\tWord 2\tHuman (mean)\nking\tqueen\t9\nman\twoman\t8\nking\tw1\t1\nqueen\tw2\t0.5\nabsent\tking\t3\n")
    sim = evaluate_similarity(wv, read_similarity(pairs_file))
    assert sim["pairs"] == 5 and sim["covered"] == 4 and -1 <= sim["spearman"] <= 1
