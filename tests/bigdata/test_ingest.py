"""RAG ingestion on Spark: chunks as `serve --docs` makes them, MiniLM vectors from the pandas
UDF equal to the driver's, only changed files embedded again, an IVF index that finds them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from mlsyskit.bigdata import chunking
from mlsyskit.bigdata.ingest import MANIFEST, ingest, load_index, load_ingested
from mlsyskit.errors import UserError

SPARK_MD = "# Spark basics\n\nSpark runs jobs on executors. A driver schedules the tasks.\n\nShuffles move data between stages.\n"
WITH_TXT = "The with statement wraps a block with methods defined by a context manager.\n"


def _long_text(seed: int) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 90))) for _ in range(10))


def test_chunks_hold_every_word_in_order_within_the_limit() -> None:
    for text in (_long_text(1), SPARK_MD, "one\r\n\r\n" + "x " * 300 + "\n  code line\n", "  \n"):
        for words in (5, 40, 120):
            chunks = chunking.chunk_text(text, words)
            assert " ".join(chunks).split() == text.split()
            assert all(0 < len(c.split()) <= words for c in chunks)
    assert chunking.title_of(SPARK_MD, "stem") != "stem" and chunking.title_of("no heading", "stem") == "stem"
    assert chunking.embedding_text("Spark basics", "Shuffles move data.") == "Spark basics\nShuffles move data."
    assert chunking.embedding_text("Spark basics", "Spark basics: shuffles") == "Spark basics: shuffles"


def test_ingest_is_incremental_and_serve_loads_it(spark, tmp_path: Path) -> None:
    from mlsyskit.serve.documents import DocumentStore
    from mlsyskit.vector import embed_texts

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "spark.md").write_text(SPARK_MD)
    (docs / "sub" / "with.txt").write_text(WITH_TXT)
    (docs / "long.txt").write_text(_long_text(0))
    (docs / "notes.csv").write_text("not,a,document\n")
    out = tmp_path / "index"
    first = ingest(spark, str(docs), out, chunk_words=60)
    assert first["files"] == 3 and first["embedded_files"] == 3 and first["reused_files"] == 0
    assert first["model_loads"] == 1  # a few KB of text: one partition, one MiniLM load
    corpus = load_ingested(out)
    assert corpus.manifest["chunks"] == len(corpus.ids) == first["chunks"] > 3
    assert corpus.ids[0].startswith("long.txt#") and "spark.md" in corpus.ids and "sub/with.txt" in corpus.ids
    # the UDF's vectors are MiniLM's, as the driver computes them
    expected = embed_texts([chunking.embedding_text(t, x) for t, x in zip(corpus.titles, corpus.texts, strict=True)])
    assert np.abs(corpus.vectors - expected).max() < 1e-4
    # the IVF index finds each chunk from its own vector
    index = load_index(out)
    _, ids = index.search(corpus.vectors, 1, index.nlist)
    assert (ids[:, 0] == np.arange(len(corpus.ids))).all()

    # change one file, add one, delete one: only the changed and the new are embedded
    (docs / "spark.md").write_text(SPARK_MD + "\nExecutors cache partitions in memory.\n")
    (docs / "new.md").write_text("# New\n\nA new note about broadcast variables.\n")
    (docs / "sub" / "with.txt").unlink()
    second = ingest(spark, str(docs), out, chunk_words=60)
    assert (second["embedded_files"], second["reused_files"], second["removed_files"]) == (2, 1, 1)
    after = load_ingested(out)
    assert "sub/with.txt" not in after.ids and "new.md" in after.ids
    long_before = {i: v for i, v in zip(corpus.ids, corpus.vectors, strict=True) if i.startswith("long.txt")}
    long_after = {i: v for i, v in zip(after.ids, after.vectors, strict=True) if i.startswith("long.txt")}
    assert long_before.keys() == long_after.keys()
    assert all(np.array_equal(long_before[i], long_after[i]) for i in long_before)  # reused, not recomputed
    assert second["embedded_chunks"] == len(after.ids) - len(long_after)

    # serve --docs OUT: the same documents as serve --docs DOCS, without embedding anything
    def refuse(_texts):
        raise AssertionError("serve embedded the ingested chunks again")

    served = DocumentStore.from_path(out, embed=refuse)
    direct = DocumentStore.from_path(docs, chunk_words=60)
    assert served.ids() == after.ids and sorted(direct.ids()) == sorted(after.ids)
    for doc in direct.documents():
        assert served.get(doc.id) == doc
    hit = served.search_vector(after.vectors[after.ids.index("new.md")], 1)
    assert hit[0].document.id == "new.md"
    assert json.loads((out / MANIFEST).read_text())["embedded_files"] == 2


def test_ingest_errors(spark, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="no .txt or .md file"):
        ingest(spark, str(empty), tmp_path / "out")
