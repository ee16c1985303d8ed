"""The RAG corpus (mlsyskit.serve.documents): loading, chunking, retrieval, prompts. No server.

Embeddings are the real MiniLM model's. The default corpus (Python's documentation topics) is
embedded once per machine and then read from the cache in ~/.cache/mlsyskit/rag (or
$MLSYSKIT_CACHE_DIR/rag): the first run of this file on a fresh machine pays for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlsyskit.errors import UserError
from mlsyskit.serve.documents import (
    DocumentStore,
    DuplicateIdError,
    Retrieved,
    _cached_embeddings,
    chunk_text,
    default_corpus,
    embed,
    fit_context,
    load_corpus,
    rag_messages,
)

FACTS = {
    "volcano.txt": "Mount Zorvath is a volcano on the island of Kelbra. It last erupted in 1873 and its crater holds a green lake.",
    "bakery.txt": "The Pellino bakery in Varnsted bakes rye bread with caraway seeds every morning at four o'clock.",
    "chess.md": "# Chess club\n\nThe Quillfield chess club meets on Thursdays; its champion, Ada Brenn, won 41 games in a row.",
}


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return folder


# -- chunking -------------------------------------------------------------------------------------
def _long_text(paragraphs: int = 25, long: int = 300) -> str:
    """Paragraphs of 3-90 words, one ``long``-word line, ``long`` words on 10 lines, some code."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    paras, i = [], 0
    for n in rng.integers(3, 90, size=paragraphs):
        paras.append(" ".join(words[i : i + n]))
        i += n
    paras.append(" ".join(f"long{j}" for j in range(long)))
    paras.append("\n".join(" ".join(f"l{j}_{m}" for m in range(long // 10)) for j in range(10)))
    paras.append("    indented code line\n        more code")
    return "\n\n".join(paras) + "\n"


def test_chunk_text_keeps_every_word_in_order_and_respects_the_limit() -> None:
    text = _long_text()
    for max_words in (7, 50, 120):
        chunks = chunk_text(text, max_words)
        assert " ".join(chunks).split() == text.split()
        assert all(0 < len(c.split()) <= max_words for c in chunks)
    # A paragraph that fits is never cut: every short paragraph is whole inside one chunk.
    chunks = chunk_text(text, 120)
    for para in text.split("\n\n"):
        if len(para.split()) <= 120 and para.strip():
            assert any(para.strip("\n") in c for c in chunks), para[:40]
    assert "    indented code line\n        more code" in chunks[-1]  # code keeps its indentation
    assert chunk_text("  \n\n \n") == []
    with pytest.raises(UserError):
        chunk_text("a b", 0)


# -- loading --------------------------------------------------------------------------------------
def test_from_path_directory_recursive_sorted_with_titles(tmp_path: Path) -> None:
    files = {**FACTS, "sub/deep.md": "## Deep note\n\nOwls of Brackmoor hunt voles at dusk.", "skip.csv": "a,b", "blank.txt": "  \n"}
    store = DocumentStore.from_path(_write(tmp_path, files))
    assert store.ids() == ["bakery.txt", "chess.md", "sub/deep.md", "volcano.txt"]  # sorted, no csv, no blank
    assert len(store) == 4
    chess = store.get("chess.md")
    assert chess is not None and chess.title == "Chess club" and chess.source == "chess.md"
    assert store.get("bakery.txt").title == "bakery"  # no heading: the file's stem
    assert store.get("sub/deep.md").title == "Deep note"
    assert store.get("nope") is None
    top = store.search("Which volcano has a green crater lake?", k=2)
    assert top[0].document.id == "volcano.txt"


def test_directory_skips_a_non_utf8_file_with_a_warning_and_counts(tmp_path: Path) -> None:
    files = {**FACTS, "notes/blank.md": " \n", "data.json": "{}"}
    folder = _write(tmp_path, files)
    (folder / "latin.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    lines: list[str] = []
    texts, ids, _, _ = load_corpus(folder, warn=lines.append)
    assert ids == ["bakery.txt", "chess.md", "volcano.txt"] and len(texts) == 3
    assert lines == [
        f"warning: --docs {folder}: skipping latin.txt: not UTF-8 text (invalid continuation byte at byte 3)",
        f"--docs {folder}: indexed 3 files, skipped 4 (1 not UTF-8, 1 empty, 2 not .txt/.md)",
    ]
    # nothing readable left: the error says what was skipped
    only = tmp_path / "only_latin"
    only.mkdir()
    (only / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"no non-empty \.txt or \.md file in this directory \(skipped 1 not UTF-8\)"):
        load_corpus(only, warn=lines.append)


def test_long_file_is_chunked_and_chunks_keep_source_and_title(tmp_path: Path) -> None:
    text = "# Big file\n\n" + _long_text(8, 160)
    (tmp_path / "big.md").write_text(text, encoding="utf-8")
    store = DocumentStore.from_path(tmp_path / "big.md", chunk_words=100)
    docs = store.documents()
    assert len(docs) > 5
    assert [d.id for d in docs] == [f"big.md#{i}" for i in range(len(docs))]
    assert all(d.source == "big.md" and d.title == "Big file" for d in docs)
    assert " ".join(d.text for d in docs).split() == text.split()


def test_jsonl_corpus(tmp_path: Path) -> None:
    rows = [
        {"id": "v", "text": FACTS["volcano.txt"], "title": "Volcano", "source": "atlas"},
        {"text": FACTS["bakery.txt"]},
        {"id": 7, "text": FACTS["chess.md"]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    store = DocumentStore.from_path(path)
    assert store.ids() == ["v", "docs.jsonl:2", "7"]
    v = store.get("v")
    assert v.title == "Volcano" and v.source == "atlas"
    assert store.get("docs.jsonl:2").source == "docs.jsonl:2"
    assert store.search("What time does the bakery bake rye bread?", 1)[0].document.id == "docs.jsonl:2"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine"}\n{"text": "broken"\n', "line 2: not valid JSON"),
        ('["a list"]\n', "line 1: expected a JSON object"),
        ('{"id": "x"}\n', "line 1: 'text' must be a non-empty string"),
        ('{"text": "  "}\n', "line 1: 'text' must be a non-empty string"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "line 2: duplicate id 'a'"),
        ('{"text": "x", "title": [1]}\n', "line 1: 'title' must be a string"),
        ("\n\n", "holds no document"),
    ],
)
def test_bad_jsonl_says_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        DocumentStore.from_path(path)
    assert message in str(e.value)
    assert "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_bad_paths_are_one_line_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = {
        tmp_path / "missing": "no such file or directory",
        tmp_path / "empty_dir": "no non-empty .txt or .md file",
        tmp_path / "empty.txt": "the file is empty",
        tmp_path / "table.csv": "expected a directory, a .txt/.md file or a .jsonl file",
        tmp_path / "latin.txt": "not UTF-8 text",
    }
    for path, message in cases.items():
        with pytest.raises(UserError) as e:
            DocumentStore.from_path(path)
        assert message in str(e.value), (path, str(e.value))
        assert "\n" not in str(e.value)


# -- the store ------------------------------------------------------------------------------------
def test_add_search_round_trip_scores_sorted() -> None:
    store = DocumentStore()
    texts = list(FACTS.values())
    ids = store.add(texts, titles=["", "", ""])
    assert ids == ["doc-0", "doc-1", "doc-2"] and len(store) == 3
    hits = store.search(texts[1], k=3)
    assert hits[0].document.id == "doc-1"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # the same text: cosine 1
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    # The scores are the cosine similarities MiniLM gives.
    vecs = embed([texts[1], *texts])
    assert [h.score for h in hits] == pytest.approx(sorted((vecs[1:] @ vecs[0]).tolist(), reverse=True), abs=1e-5)
    assert len(store.search("anything", k=10)) == 3  # k larger than the store
    more = store.add(["Glass frogs of Oru have see-through bellies."], ids=["frog"], sources=["zoo"], titles=["Frogs"])
    assert more == ["frog"] and store.get("frog").source == "zoo"
    assert store.search("Which frogs have transparent skin?", k=1)[0].document.id == "frog"
    assert store.add(["x y z"]) == ["doc-3"]  # generated ids continue


def test_store_rejects_bad_input() -> None:
    store = DocumentStore()
    store.add(["one text"], ids=["a"])
    with pytest.raises(DuplicateIdError):
        store.add(["another"], ids=["a"])
    with pytest.raises(DuplicateIdError):
        store.add(["p", "q"], ids=["b", "b"])
    assert len(store) == 1 and store.get("b") is None  # all or nothing
    with pytest.raises(UserError, match="empty"):
        store.add(["   "])
    with pytest.raises(UserError, match="ids has 2 entries"):
        store.add(["x"], ids=["c", "d"])
    with pytest.raises(UserError, match="not one string"):
        store.add("a string")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="query is empty"):
        store.search("  ", 3)
    with pytest.raises(UserError, match="k must be"):
        store.search("q", 0)
    assert DocumentStore().search("anything", 3) == []
    with pytest.raises(UserError, match="surrogate"):  # JSON can carry one; the tokenizer cannot
        store.add(["bad \ud800 text"])
    with pytest.raises(UserError, match="surrogate"):
        store.add(["good text"], titles=["\udc00"])
    with pytest.raises(UserError, match="surrogate"):
        store.search("\ud800?", 1)
    assert len(store) == 1


def test_add_with_chunking_splits_long_texts() -> None:
    store = DocumentStore()
    text = _long_text(6, 200)
    ids = store.add([text, "short one"], ids=["long", "short"], chunk_words=150)
    assert ids[-1] == "short" and ids[0] == "long#0" and len(ids) > 5
    assert " ".join(store.get(i).text for i in ids[:-1]).split() == text.split()


def test_embedding_cache_round_trip(tmp_path: Path) -> None:
    texts, titles = ["The kettle whistles.", "Snow fell on Tuesday."], ["a", "b"]
    first = _cached_embeddings(texts, titles, embed, tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers
    np.testing.assert_allclose(first, embed(["a\nThe kettle whistles.", "b\nSnow fell on Tuesday."]), atol=1e-5)
    assert np.array_equal(_cached_embeddings(texts, titles, embed, tmp_path), first)
    files[0].write_bytes(b"not a numpy file")  # damaged: recomputed and rewritten
    np.testing.assert_allclose(_cached_embeddings(texts, titles, embed, tmp_path), first, atol=1e-6)
    assert np.array_equal(np.load(files[0]), _cached_embeddings(texts, titles, embed, tmp_path))
    _cached_embeddings(["Other corpus."], ["c"], embed, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # keyed by content


# -- the default corpus ---------------------------------------------------------------------------
def test_default_corpus_is_pydoc_topics_without_repeats() -> None:
    from pydoc_data.topics import topics

    texts, ids, sources, titles = default_corpus()
    assert len(set(titles)) >= 70 and {"with", "assert", "while", "async", "yield"} <= set(titles)
    assert set(titles) <= set(topics)
    assert all(s == f"pydoc_data.topics:{t}" for s, t in zip(sources, titles, strict=True))
    assert len(set(ids)) == len(ids) and all(0 < len(t.split()) <= 120 for t in texts)
    # The with statement's steps live in the "with" topic only, not again inside "compound".
    step = 'The context manager’s "__enter__()" method is invoked.'
    owners = {title for text, title in zip(texts, titles, strict=True) if step in text}
    assert owners == {"with"}


@pytest.fixture(scope="module")
def pydoc_store() -> DocumentStore:
    return DocumentStore.from_path(None)


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("How does the with statement call __enter__ and __exit__?", "with"),
        ("what does the assert statement do when optimization is requested", "assert"),
        ("How does the import statement find and load a module?", "import"),
        ("What does a yield expression do inside a generator function?", "yield"),
        ("Which values are considered false when testing truth value?", "truth"),
        ("What does the continue statement do?", "continue"),
        ("How does str.split split a string?", "string-methods"),
    ],
)
def test_default_corpus_top_hit_is_the_right_topic(pydoc_store: DocumentStore, question: str, topic: str) -> None:
    hits = pydoc_store.search(question, k=5)
    assert hits[0].document.title == topic, [(h.document.id, round(h.score, 3)) for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# -- prompts --------------------------------------------------------------------------------------
def _hits() -> list[Retrieved]:
    from mlsyskit.serve.documents import Document

    return [
        Retrieved(Document(f"d{i}", f"fact number {i} " + " ".join(f"w{i}_{j}" for j in range(40)), "src", f"T{i}"), 1 - i / 10)
        for i in range(3)
    ]


def _words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_rag_messages_number_the_documents_and_end_with_the_question() -> None:
    msgs = rag_messages("What is fact one?", _hits())
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "[1], [2]" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert user.index("[1] T0\nfact number 0") < user.index("[2] T1") < user.index("[3] T2")
    assert user.endswith("Question: What is fact one?")


def test_rag_messages_fit_the_context_budget() -> None:
    hits = _hits()
    full = _words(rag_messages("q?", hits))
    # Room for about two documents: the third is dropped, the second is shortened, never the question.
    budget = full - 60
    msgs = rag_messages("q?", hits, max_context_tokens=budget, count_tokens=_words)
    assert _words(msgs) <= budget and msgs[1]["content"].endswith("Question: q?")
    assert "[3]" not in msgs[1]["content"] and "[2] T1" in msgs[1]["content"] and " ..." in msgs[1]["content"]
    kept, texts = fit_context("q?", hits, max_context_tokens=budget, count_tokens=_words)
    assert [h.document.id for h in kept] == ["d0", "d1"] and texts[0] == hits[0].document.text
    # No room for any document: the question alone.
    tiny = rag_messages("q?", hits, max_context_tokens=_words(rag_messages("q?", [])), count_tokens=_words)
    assert "[1]" not in tiny[1]["content"]
    assert rag_messages("q?", hits, max_context_tokens=10**6, count_tokens=_words) == rag_messages("q?", hits)
