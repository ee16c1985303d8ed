"""Chunking of documents for RAG: the one rule ``mlsyskit spark ingest`` and ``mlsyskit serve
--docs`` both use (serve imports it from here), so an ingested folder and the same folder given
to ``serve --docs`` hold the same documents.

A text is split at paragraph boundaries (blank lines) into chunks of at most ``max_words``
words; a longer paragraph is split at line breaks, then at words. The chunks hold every word
of the text, in order. A file's title is its first Markdown heading (in its first 20 lines),
else its file name without the extension; a chunk is embedded with its title in front unless
the chunk already starts with it. A file's chunks are ``rel``, or ``rel#0``, ``rel#1``...
where ``rel`` is its path under the folder.
"""

from __future__ import annotations

import re

from mlsyskit.errors import UserError

CHUNK_WORDS = 120  # ~170-250 MiniLM tokens for prose: the chunk fits the 256-token window
TEXT_SUFFIXES = (".txt", ".md")


def _split_long(paragraph: str, max_words: int) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for line in paragraph.split("\n"):
        words = line.split()
        if not words:
            continue
        if count + len(words) > max_words and current:
            pieces.append("\n".join(current))
            current, count = [], 0
        cut = False
        while len(words) > max_words:  # one very long line: cut at word boundaries
            pieces.append(" ".join(words[:max_words]))
            words, cut = words[max_words:], True
        if not words:
            continue
        current.append(" ".join(words) if cut else line.rstrip())  # keep code indentation
        count += len(words)
    if current:
        pieces.append("\n".join(current))
    return pieces


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """``text`` split at paragraph boundaries into chunks of at most ``max_words`` words.

    Together the chunks hold every word of ``text`` in order (``" ".join(chunks).split() ==
    text.split()``); whitespace-only text gives no chunk.
    """
    if max_words < 1:
        raise UserError(f"max_words must be at least 1, got {max_words}")
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for para in paragraphs:
        n = len(para.split())
        if n == 0:
            continue
        if n > max_words:
            if current:
                chunks.append("\n\n".join(current))
                current, count = [], 0
            chunks.extend(_split_long(para, max_words))
            continue
        if count + n > max_words and current:
            chunks.append("\n\n".join(current))
            current, count = [], 0
        current.append(para)
        count += n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def title_of(text: str, fallback: str) -> str:
    """The first Markdown heading in the first 20 lines, else ``fallback``."""
    for line in text.splitlines()[:20]:
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            return m.group(1)
    return fallback


def chunk_ids(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}#{i}" for i in range(n)]


def embedding_text(title: str, text: str) -> str:
    """What is embedded for a chunk: its title and its text."""
    return f"{title}\n{text}" if title and not text.startswith(title) else text


def chunk_document(rel: str, text: str, max_words: int = CHUNK_WORDS) -> list[dict[str, object]]:
    """The chunks of the file ``rel``: dicts with id, source, title, chunk (index) and text."""
    stem = rel.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    title = title_of(text, stem)
    parts = chunk_text(text, max_words)
    return [
        {"id": cid, "source": rel, "title": title, "chunk": i, "text": part}
        for i, (cid, part) in enumerate(zip(chunk_ids(rel, len(parts)), parts, strict=True))
    ]
