"""The RAG corpus: documents, their MiniLM embeddings, and exact top-k retrieval.

    store = DocumentStore.from_path("notes/")          # every *.txt / *.md file, recursively
    store = DocumentStore.from_path(None)              # the embedded default corpus (below)
    hits = store.search("How does the with statement work?", k=3)   # [Retrieved(document, score)]
    messages = rag_messages(question, hits)            # chat messages for the engine

Embeddings are all-MiniLM-L6-v2's (``mlsyskit.vector.embed_texts``: offline, unit length, 384
dimensions), so the dot product is the cosine similarity; retrieval is exact
(``mlsyskit.vector.knn`` with metric "dot") and a score is that similarity: higher is better.

**Default corpus.** With no path, the corpus is Python's own documentation topics, the
``pydoc_data.topics`` module of the standard library (what ``help("with")`` shows), so every
machine has it offline: 79 topics of the language reference ("assert", "async", "while",
"with", ...), each document titled by its topic name. Several large topics ("compound",
"specialnames", ...) repeat the text of smaller ones verbatim; a repeated paragraph is kept only
in the smallest topic that has it, so a question about the "with" statement finds the "with"
topic, not the same text inside "compound" (a topic left with no paragraph of its own is
dropped). With Python 3.11 that leaves 580 chunks of 78 topics, about 53,000 words (96,000
MiniLM tokens); embedding them takes about a minute of CPU time (66 s measured on one core of
the development machine), so the embeddings are cached in
``$MLSYSKIT_CACHE_DIR/rag`` (default ``~/.cache/mlsyskit/rag``), keyed by a hash of the chunk
texts and the model, written atomically; a later start loads them in milliseconds. A corpus
loaded from a path is embedded at load time and not cached.

**Chunking.** Long texts are split at paragraph boundaries (blank lines) into chunks of at
most ``CHUNK_WORDS`` words (a longer paragraph is split at line breaks, then at words), so each
chunk fits the embedding model's 256-token window; every chunk keeps its source and title, and
together the chunks hold every word of the text, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlsyskit.bigdata import chunking
from mlsyskit.bigdata.chunking import CHUNK_WORDS, TEXT_SUFFIXES, chunk_ids, chunk_text, title_of
from mlsyskit.errors import UserError

EMBED_DIM = 384
DEFAULT_SOURCE = "pydoc_data.topics"
_CACHE_VERSION = "1"

EmbedFn = Callable[[Sequence[str]], np.ndarray]

# The MiniLM tokenizer (Rust) refuses concurrent use from several threads ("Already borrowed"),
# and two forward passes at once only fight over the same cores: one embedding call at a time.
EMBED_LOCK = threading.Lock()


def embed(texts: Sequence[str]) -> np.ndarray:
    """MiniLM embeddings of ``texts`` (float32, (n, 384), unit rows), one call at a time."""
    from mlsyskit.vector import embed_texts

    with EMBED_LOCK:
        return embed_texts(list(texts))


def count_embedding_tokens(texts: Sequence[str]) -> list[int]:
    """Tokens MiniLM reads from each text (after truncation to its 256-token window)."""
    from mlsyskit.vector.embed import MAX_TOKENS, _load

    with EMBED_LOCK:
        tokenizer, _ = _load()
        enc = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
    return [len(ids) for ids in enc["input_ids"]]


def check_text(text: str, what: str) -> None:
    """UserError unless ``text`` is valid Unicode (JSON lets a client send a lone surrogate,
    which neither the tokenizer nor a UTF-8 response can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} contains an unpaired surrogate (not valid Unicode text)") from None


class DuplicateIdError(UserError):
    """A document id that the store already holds (or that one call gives twice)."""


@dataclass(frozen=True)
class Document:
    """One retrievable text (a chunk of a file, a topic or an added text)."""

    id: str
    text: str
    source: str = ""
    title: str = ""


@dataclass(frozen=True)
class Retrieved:
    """A search hit: the document and its similarity to the query (cosine, higher is better)."""

    document: Document
    score: float


# -- the store ----------------------------------------------------------------------------------
class DocumentStore:
    """Documents and their embeddings; exact top-k search by cosine similarity.

    Thread-safe: ``add`` and ``search`` may run from several threads (the server runs them off
    its event loop); embedding happens outside the store's lock.
    """

    def __init__(self, embed: EmbedFn = embed) -> None:
        self._embed = embed
        self._docs: list[Document] = []
        self._by_id: dict[str, int] = {}
        self._vectors = np.empty((0, EMBED_DIM), np.float32)
        self._size = 0  # rows of _vectors in use (it grows by doubling)
        self._lock = threading.Lock()
        self._ids = 0  # counter for generated ids

    def __len__(self) -> int:
        return self._size

    def get(self, doc_id: str) -> Document | None:
        """The document with this id, or None."""
        with self._lock:
            i = self._by_id.get(doc_id)
            return None if i is None else self._docs[i]

    def ids(self, offset: int = 0, limit: int | None = None) -> list[str]:
        """Document ids in insertion order, ``limit`` of them from ``offset``."""
        with self._lock:
            docs = self._docs[offset : None if limit is None else offset + limit]
            return [d.id for d in docs]

    def documents(self, offset: int = 0, limit: int | None = None) -> list[Document]:
        """Documents in insertion order, ``limit`` of them from ``offset``."""
        with self._lock:
            return list(self._docs[offset : None if limit is None else offset + limit])

    def add(
        self,
        texts: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        titles: Sequence[str] | None = None,
        chunk_words: int | None = None,
        vectors: np.ndarray | None = None,
    ) -> list[str]:
        """Embed and add ``texts``; returns the new documents' ids (all or none are added).

        ``ids`` default to ``doc-<n>``; an id already in the store (or repeated) is a UserError.
        With ``chunk_words``, a longer text becomes several documents ``<id>#0``, ``<id>#1``...
        ``vectors``: precomputed embeddings, one unit row per text (no chunking then).
        """
        if isinstance(texts, str):
            raise UserError("add() takes a list of texts, not one string")
        texts = list(texts)
        for name, seq in (("ids", ids), ("sources", sources), ("titles", titles)):
            if seq is not None and len(seq) != len(texts):
                raise UserError(f"{name} has {len(seq)} entries but there are {len(texts)} texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise UserError(f"text {i} is empty: a document needs some text")
            check_text(t, f"text {i}")
        for name, seq in (("id", ids), ("source", sources), ("title", titles)):
            for i, x in enumerate(seq or []):
                check_text(str(x or ""), f"the {name} of text {i}")
        if vectors is not None and chunk_words is not None:
            raise UserError("give either vectors or chunk_words, not both")
        with self._lock:
            if ids is None:
                base_ids = []
                for _ in texts:
                    while f"doc-{self._ids}" in self._by_id:
                        self._ids += 1
                    base_ids.append(f"doc-{self._ids}")
                    self._ids += 1
            else:
                base_ids = [str(x) for x in ids]
        docs: list[Document] = []
        for i, text in enumerate(texts):
            source = "" if sources is None else str(sources[i] or "")
            title = "" if titles is None else str(titles[i] or "")
            parts = [text] if chunk_words is None else chunk_text(text, chunk_words)
            docs.extend(
                Document(cid, part, source, title)
                for cid, part in zip(chunk_ids(base_ids[i], len(parts)), parts, strict=True)
            )
        new_ids = [d.id for d in docs]
        if len(set(new_ids)) != len(new_ids):
            dup = next(x for x in new_ids if new_ids.count(x) > 1)
            raise DuplicateIdError(f"document id {dup!r} is given twice")
        with self._lock:
            taken = next((x for x in new_ids if x in self._by_id), None)
        if taken is not None:
            raise DuplicateIdError(f"a document with id {taken!r} already exists")
        if vectors is None:
            vectors = self._embed([embedding_text(d) for d in docs]) if docs else np.empty((0, EMBED_DIM), np.float32)
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(docs), EMBED_DIM):
            raise UserError(f"expected embeddings of shape ({len(docs)}, {EMBED_DIM}), got {vectors.shape}")
        with self._lock:
            taken = next((x for x in new_ids if x in self._by_id), None)  # a concurrent add won
            if taken is not None:
                raise DuplicateIdError(f"a document with id {taken!r} already exists")
            need = self._size + len(docs)
            if need > self._vectors.shape[0]:
                grown = np.empty((max(need, 2 * self._vectors.shape[0], 64), EMBED_DIM), np.float32)
                grown[: self._size] = self._vectors[: self._size]
                self._vectors = grown
            self._vectors[self._size : need] = vectors
            for d in docs:
                self._by_id[d.id] = len(self._docs)
                self._docs.append(d)
            self._size = need
        return new_ids

    def search(self, query: str, k: int) -> list[Retrieved]:
        """The ``k`` documents most similar to ``query`` (fewer if the store is smaller), best
        first; ties by insertion order."""
        if not isinstance(query, str) or not query.strip():
            raise UserError("the query is empty")
        check_text(query, "the query")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        q = self._embed([query])
        return self.search_vector(q[0], k)

    def search_vector(self, vector: np.ndarray, k: int) -> list[Retrieved]:
        """Like :meth:`search` for an already embedded (unit) query vector."""
        from mlsyskit.vector import knn

        with self._lock:
            n = self._size
            if n == 0:
                return []
            # The rows in use never change once written (add only appends), so a view is safe
            # outside the lock, but knn is quick: keep it simple and hold the lock.
            dist, idx = knn(self._vectors[:n], np.asarray(vector, np.float32)[None, :], min(k, n), metric="dot")
            docs = self._docs
            return [Retrieved(docs[int(i)], float(-d)) for d, i in zip(dist[0], idx[0], strict=True)]

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_path(
        cls,
        path: str | Path | None,
        *,
        embed: EmbedFn = embed,
        chunk_words: int = CHUNK_WORDS,
        cache_dir: str | Path | None = None,
    ) -> DocumentStore:
        """A store holding the corpus at ``path``: a directory (every ``*.txt``/``*.md`` file,
        recursively, in sorted order), one ``.txt``/``.md`` file, or a ``.jsonl`` file (one
        object a line: ``text`` and optional ``id``, ``title``, ``source``). ``None``: the
        default corpus, Python's documentation topics (embeddings cached under ``cache_dir``,
        default ``$MLSYSKIT_CACHE_DIR/rag``). A folder written by ``mlsyskit spark ingest`` is
        loaded with its stored chunks and vectors (nothing is embedded). UserError with one
        clear line on bad input."""
        store = cls(embed=embed)
        if path is None:
            texts, ids, sources, titles = default_corpus(chunk_words)
            vectors = _cached_embeddings(texts, titles, embed, cache_dir)
            store.add(texts, ids=ids, sources=sources, titles=titles, vectors=vectors)
            return store
        from mlsyskit.bigdata.ingest import is_ingested, load_ingested

        if is_ingested(Path(path).expanduser()):
            # a folder written by `mlsyskit spark ingest`: its chunks and MiniLM vectors as they are
            corpus = load_ingested(Path(path).expanduser())
            store.add(corpus.texts, ids=corpus.ids, sources=corpus.sources, titles=corpus.titles, vectors=corpus.vectors)
            return store
        texts, ids, sources, titles = load_corpus(path)
        store.add(texts, ids=ids, sources=sources, titles=titles, chunk_words=chunk_words)
        return store


def embedding_text(doc: Document) -> str:
    """What is embedded for a document: its title (a topic name, a file's heading) and text."""
    return chunking.embedding_text(doc.title, doc.text)


# -- corpora ------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _load_jsonl(path: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    texts, ids, sources, titles = [], [], [], []
    seen: set[str] = set()
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with a 'text' field")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        for key in ("id", "title", "source"):
            if obj.get(key) is not None and not isinstance(obj[key], str | int):
                raise UserError(f"{where}: '{key}' must be a string")
        doc_id = str(obj["id"]) if obj.get("id") is not None else f"{path.name}:{lineno}"
        if doc_id in seen:
            raise UserError(f"{where}: duplicate id {doc_id!r}")
        seen.add(doc_id)
        texts.append(text)
        ids.append(doc_id)
        sources.append(str(obj.get("source") or f"{path.name}:{lineno}"))
        titles.append(str(obj.get("title") or ""))
    return texts, ids, sources, titles


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_corpus(path: str | Path, warn: Callable[[str], None] = _stderr) -> tuple[list[str], list[str], list[str], list[str]]:
    """(texts, ids, sources, titles) of the documents at ``path`` (see DocumentStore.from_path).

    In a directory, files that cannot be indexed are skipped: other suffixes and empty files
    silently, a file that is not UTF-8 (or cannot be read) with a one-line warning; then one
    line says how many files were indexed and skipped (each line goes to ``warn``, default
    stderr). A single file given directly must be readable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--docs {path}: no such file or directory")
    if p.is_dir():
        every = sorted(f for f in p.rglob("*") if f.is_file())
        files = [f for f in every if f.suffix.lower() in TEXT_SUFFIXES]
        texts, ids, sources, titles = [], [], [], []
        skipped = {"not UTF-8": 0, "unreadable": 0, "empty": 0, "not .txt/.md": len(every) - len(files)}
        for f in files:
            rel = f.relative_to(p).as_posix()
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:  # one bad file does not stop the others
                if isinstance(e, UnicodeDecodeError):
                    kind, reason = "not UTF-8", f"not UTF-8 text ({e.reason} at byte {e.start})"
                else:
                    kind, reason = "unreadable", f"cannot read ({e.strerror})"
                skipped[kind] += 1
                warn(f"warning: --docs {path}: skipping {rel}: {reason}")
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            texts.append(text)
            ids.append(rel)
            sources.append(rel)
            titles.append(title_of(text, f.stem))
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        if not texts:
            raise UserError(f"--docs {path}: no non-empty .txt or .md file in this directory" + (f" (skipped {why})" if why else ""))
        warn(f"--docs {path}: indexed {len(texts)} file{'s' * (len(texts) != 1)}, skipped {sum(skipped.values())}" + (f" ({why})" if why else ""))
        return texts, ids, sources, titles
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        out = _load_jsonl(p)
        if not out[0]:
            raise UserError(f"--docs {path}: the JSONL file holds no document")
        return out
    if suffix in TEXT_SUFFIXES:
        text = _read_text(p)
        if not text.strip():
            raise UserError(f"--docs {path}: the file is empty")
        return [text], [p.name], [p.name], [title_of(text, p.stem)]
    raise UserError(f"--docs {path}: expected a directory, a .txt/.md file or a .jsonl file")


def default_corpus(chunk_words: int = CHUNK_WORDS) -> tuple[list[str], list[str], list[str], list[str]]:
    """Python's documentation topics (``pydoc_data.topics``), chunked, repeated paragraphs kept
    only in the smallest topic that has them: (texts, ids, sources, titles) of the chunks."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        raise UserError("the default RAG corpus needs the standard library's pydoc_data; give --docs DIR") from None
    # Each paragraph's owner: the smallest topic containing it (ties: alphabetical).
    split = {name: [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()] for name, text in topics.items()}
    owner: dict[str, str] = {}
    for name in sorted(split, key=lambda n: (len(topics[n]), n)):
        for para in split[name]:
            owner.setdefault(para.strip(), name)
    texts, ids, sources, titles = [], [], [], []
    for name in sorted(split):
        # Short paragraphs ("Note:", "See also:") stay everywhere: they carry no topic of their own.
        kept = [p for p in split[name] if owner[p.strip()] == name or len(p.split()) < 8]
        parts = chunk_text("\n\n".join(kept), chunk_words)
        if sum(len(c.split()) for c in parts) < 8:
            continue  # every substantial paragraph belongs to a smaller topic
        texts.extend(parts)
        ids.extend(chunk_ids(name, len(parts)))
        sources.extend([f"{DEFAULT_SOURCE}:{name}"] * len(parts))
        titles.extend([name] * len(parts))
    return texts, ids, sources, titles


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from mlsyskit.data.paths import default_cache_dir

    return default_cache_dir() / "rag"


def _cached_embeddings(texts: list[str], titles: list[str], embed_fn: EmbedFn, cache_dir: str | Path | None) -> np.ndarray:
    """Embeddings of the default corpus, from the disk cache when an identical corpus was
    embedded before (same chunk texts, titles and model); computed and stored otherwise. Only
    the stock embedding function is cached: a custom one is always called."""
    docs = [Document("", t, "", title) for t, title in zip(texts, titles, strict=True)]
    inputs = [embedding_text(d) for d in docs]
    if embed_fn is not embed:
        return np.asarray(embed_fn(inputs), np.float32)
    from mlsyskit.vector.embed import MAX_TOKENS, model_dir

    h = hashlib.sha256()
    config = model_dir() / "config.json"
    for part in (_CACHE_VERSION, str(MAX_TOKENS), config.read_text(encoding="utf-8") if config.is_file() else "", *inputs):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    path = _cache_root(cache_dir) / f"pydoc-{h.hexdigest()[:32]}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.dtype == np.float32 and cached.shape == (len(inputs), EMBED_DIM) and np.isfinite(cached).all():
            return cached
    except (OSError, ValueError):
        pass  # absent or damaged: recompute
    vectors = np.asarray(embed_fn(inputs), np.float32)
    _atomic_save(path, vectors)
    return vectors


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file and a rename: readers never see half a
    file. A cache that cannot be written (read-only home) is skipped silently."""
    tmp: Any = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- prompts ------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context documents. Cite the documents you use "
    "as [1], [2], ... If the documents do not contain the answer, say that you do not know."
)


def _format_doc(i: int, r: Retrieved, text: str) -> str:
    title = r.document.title or r.document.source
    head = f"[{i}] {title}" if title else f"[{i}]"
    return f"{head}\n{text}"


def build_messages(query: str, docs: list[Retrieved], texts: list[str]) -> list[dict]:
    """The system and user messages for ``query`` with ``docs`` (their ``texts``) as context."""
    context = "\n\n".join(_format_doc(i + 1, r, t) for i, (r, t) in enumerate(zip(docs, texts, strict=True)))
    user = f"Context documents:\n\n{context}\n\nQuestion: {query}" if docs else f"Question: {query}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def rag_messages(
    query: str,
    docs: list[Retrieved],
    *,
    max_context_tokens: int | None = None,
    count_tokens: Callable[[list[dict]], int] | None = None,
) -> list[dict]:
    """Chat messages asking the model to answer ``query`` from ``docs``, numbered [1], [2]...

    With ``max_context_tokens`` and ``count_tokens`` (the prompt tokens of a message list, e.g.
    ``len(service.chat_prompt(m))``), the context is cut to fit (see :func:`fit_context`).
    """
    kept, texts = fit_context(query, docs, max_context_tokens=max_context_tokens, count_tokens=count_tokens)
    return build_messages(query, kept, texts)


def fit_context(
    query: str,
    docs: list[Retrieved],
    *,
    max_context_tokens: int | None = None,
    count_tokens: Callable[[list[dict]], int] | None = None,
) -> tuple[list[Retrieved], list[str]]:
    """The documents (a prefix of ``docs``) and texts that fit ``max_context_tokens``.

    The lowest-ranked documents are dropped first, then the last remaining one is shortened at
    a word boundary (binary search on the word count). The question is never cut: a question
    too long on its own gives no document, and the caller reports the prompt as too long.
    """
    texts = [r.document.text for r in docs]
    docs = list(docs)
    if max_context_tokens is None or count_tokens is None:
        return docs, texts
    budget = max_context_tokens

    def fits(ds: list[Retrieved], ts: list[str]) -> bool:
        return count_tokens(build_messages(query, ds, ts)) <= budget

    if not docs or fits(docs, texts):
        return docs, texts
    # Drop the lowest-ranked documents while even the others alone are too long...
    while len(docs) > 1 and not fits(docs[:-1], texts[:-1]):
        docs, texts = docs[:-1], texts[:-1]
    # ...then keep as many words of the last one as fit.
    words = texts[-1].split()
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(docs, texts[:-1] + [" ".join(words[:mid]) + " ..."]):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return docs[:-1], texts[:-1]
    return docs, texts[:-1] + [" ".join(words[:lo]) + " ..."]
