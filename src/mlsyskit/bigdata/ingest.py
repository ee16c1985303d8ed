"""RAG ingestion at scale: a document folder -> chunks -> MiniLM embeddings -> Parquet + IVF.

    summary = ingest(spark, "docs/", "rag-index/")     # Spark jobs; again later: only changes
    corpus = load_ingested("rag-index/")               # no Spark: texts, ids, vectors (n, 384)

The output folder holds ``chunks.parquet`` (one row per chunk: ``id``, ``source`` (the file's
path under the folder), ``title``, ``chunk`` (its index in the file), ``text``, ``sha256`` (of
the file's bytes) and ``vector``: 384 float32, unit length), ``index.mlskvec`` (an
:class:`~mlsyskit.vector.IVFIndex`, metric "dot", whose ids are the rows of
:func:`load_ingested`'s order) and ``mlsyskit-ingest.json`` (the manifest).

* Files: every ``*.txt`` / ``*.md`` under the folder, read by Spark's ``binaryFile`` source
  (any Spark-readable URI; names starting with ``.`` or ``_`` are hidden to Spark and
  skipped), decoded as UTF-8 (invalid bytes replaced, and counted in the summary).
* Chunks: by the rule of ``mlsyskit serve --docs`` (:mod:`mlsyskit.bigdata.chunking`), in a
  ``mapInPandas`` over the files.
* Embeddings: all-MiniLM-L6-v2 (``mlsyskit.vector.embed_texts``) in an iterator pandas UDF:
  Arrow batches of ``batch_size`` chunks, the model loaded once per Python worker (workers are
  reused across tasks; the number of loads is counted with an accumulator and reported). The
  chunks are spread over at most one partition per ~64 KB of new text, so a small change does
  not load the model in every worker.
* Incremental: a file whose path and SHA-256 are unchanged keeps its rows (and vectors) from
  the previous run; new and changed files are embedded; deleted files' rows are dropped. The
  new table is written next to the old one and swapped in by renames.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsyskit.bigdata.chunking import TEXT_SUFFIXES, chunk_document, embedding_text
from mlsyskit.errors import UserError

MANIFEST = "mlsyskit-ingest.json"
CHUNKS = "chunks.parquet"
INDEX = "index.mlskvec"
FORMAT = "mlsyskit-rag-ingest"
EMBED_DIM = 384
MODEL = "all-MiniLM-L6-v2"
_BYTES_PER_PARTITION = 64 * 1024

_CHUNK_SCHEMA = "id string, source string, title string, chunk int, text string, sha256 string, bad_utf8 boolean"


def is_ingested(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`ingest`."""
    return (Path(path) / MANIFEST).is_file()


def _root_prefix(docs: str) -> str:
    """How Spark spells the paths of files under ``docs`` up to the relative part."""
    if "://" in docs or docs.startswith("file:"):
        root = docs
    else:
        root = "file:" + str(Path(docs).resolve())
    return root.rstrip("/") + "/"


def _chunker(prefix: str, chunk_words: int) -> Any:
    def chunk_files(batches: Any) -> Any:
        import pandas as pd

        for pdf in batches:
            rows = []
            for path, sha, content in zip(pdf["path"], pdf["sha256"], pdf["content"], strict=True):
                rel = path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]
                try:
                    text, bad = bytes(content).decode("utf-8"), False
                except UnicodeDecodeError:
                    text, bad = bytes(content).decode("utf-8", errors="replace"), True
                for row in chunk_document(rel, text, chunk_words):
                    rows.append({**row, "sha256": sha, "bad_utf8": bad})
            yield pd.DataFrame(rows, columns=["id", "source", "title", "chunk", "text", "sha256", "bad_utf8"])

    return chunk_files


def _embedder(batch_size: int, loads: Any) -> Any:
    """The iterator pandas UDF (title, text) -> vector; the model stays loaded in the worker."""
    import typing

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def embed(batches: Any) -> Any:
        import torch

        from mlsyskit.vector import embed as embed_module

        torch.set_num_threads(1)  # one task per core: intra-op threads would only fight
        for titles, texts in batches:
            if embed_module._load.cache_info().currsize == 0:
                loads.add(1)  # this Python worker loads MiniLM now (once: the load is cached)
            inputs = [embedding_text(a, b) for a, b in zip(titles, texts, strict=True)]
            vectors = embed_module.embed_texts(inputs, batch_size=batch_size)
            yield pd.Series(list(vectors))

    # Spark picks the UDF kind from the type hints (this module's hints are strings).
    embed.__annotations__ = {"batches": typing.Iterator[typing.Tuple[pd.Series, pd.Series]], "return": typing.Iterator[pd.Series]}  # noqa: UP006
    return pandas_udf(embed, "array<float>")


def _read_previous(out: Path) -> dict[str, str]:
    """{source: sha256} of the previous run's table, {} when there is none."""
    if not (out / CHUNKS).exists():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(out / CHUNKS, columns=["source", "sha256"])
    return dict(zip(table.column("source").to_pylist(), table.column("sha256").to_pylist(), strict=True))


def ingest(
    spark: Any,
    docs: str,
    out: str | Path,
    *,
    chunk_words: int = 120,
    nlist: int | None = None,
    batch_size: int = 64,
    progress: Any = None,
) -> dict[str, Any]:
    """Chunk, embed and index the documents under ``docs`` into ``out`` (module docstring);
    returns the summary (also in the manifest)."""
    import contextlib

    from pyspark.sql import functions as F

    from mlsyskit.bigdata.io import prepare_out, spark_errors, write_json

    if chunk_words < 1 or batch_size < 1:
        raise UserError("chunk_words and batch_size must be at least 1")
    out = prepare_out(out)
    step = progress.step if progress is not None else (lambda what: contextlib.nullcontext())
    t0 = time.perf_counter()
    prefix = _root_prefix(docs)
    manifest_path = out / MANIFEST
    old_manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if old_manifest and old_manifest.get("chunk_words") != chunk_words:
        previous: dict[str, str] = {}  # another chunking: every file is new
    else:
        previous = _read_previous(out)
    with spark_errors(f"--docs {docs}"), step("listing and hashing the files"):
        files = (
            spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(docs)
            .where(F.lower("path").rlike("(" + "|".join(s.replace(".", "\\.") for s in TEXT_SUFFIXES) + ")$"))
            .select("path", "length", F.sha2("content", 256).alias("sha256"))
        )
        listing = [(r["path"], r["sha256"], r["length"]) for r in files.collect()]
    if not listing:
        raise UserError(f"--docs {docs}: no .txt or .md file in this folder")
    current = {(p[len(prefix):] if p.startswith(prefix) else p.rsplit("/", 1)[-1]): (p, sha, n) for p, sha, n in listing}
    changed = {rel for rel, (_, sha, _) in current.items() if previous.get(rel) != sha}
    kept = {rel for rel in current if rel not in changed and rel in previous}
    removed = set(previous) - set(current)
    loads = spark.sparkContext.accumulator(0)
    if changed or removed or not (out / CHUNKS).exists():
        staging = out / f".{CHUNKS}.{uuid.uuid4().hex[:8]}"
        with spark_errors(f"--docs {docs}"), step(f"chunking and embedding {len(changed)} new or changed files"):
            new_bytes = sum(current[rel][2] for rel in changed)
            parts = max(1, min(spark.sparkContext.defaultParallelism, math.ceil(new_bytes / _BYTES_PER_PARTITION)))
            raw = (
                spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(docs)
                .where(F.col("path").isin([current[rel][0] for rel in sorted(changed)]))
                .select("path", F.sha2("content", 256).alias("sha256"), "content")
            )
            chunks = raw.repartition(parts).mapInPandas(_chunker(prefix, chunk_words), _CHUNK_SCHEMA)
            embedded = chunks.withColumn("vector", _embedder(batch_size, loads)("title", "text"))
            if kept:
                old = spark.read.parquet(str(out / CHUNKS)).where(F.col("source").isin(sorted(kept)))
                embedded = embedded.unionByName(old.select(*embedded.columns))
            try:
                embedded.write.parquet(str(staging))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        _swap(staging, out / CHUNKS)
    with step("building the IVF index"):
        corpus = load_ingested(out, _check_manifest=False)
        if len(corpus.ids) == 0:
            raise UserError(f"--docs {docs}: the files hold no text to index")
        index_info = _build_index(corpus.vectors, out / INDEX, nlist)
    import pyarrow.parquet as pq

    bad = int(sum(pq.read_table(out / CHUNKS, columns=["bad_utf8"]).column("bad_utf8").to_pylist()))
    summary = {
        "format": FORMAT, "version": 1, "model": MODEL, "dim": EMBED_DIM, "chunk_words": chunk_words,
        "docs": docs, "files": len(current), "chunks": len(corpus.ids),
        "embedded_files": len(changed), "reused_files": len(kept), "removed_files": len(removed),
        "embedded_chunks": int(len(corpus.ids) - sum(1 for s in corpus.sources if s in kept)),
        "model_loads": int(loads.value), "chunks_with_invalid_utf8": bad,
        **index_info, "parquet": str(out / CHUNKS), "index": str(out / INDEX),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(manifest_path, summary)
    return summary


def _swap(staging: Path, target: Path) -> None:
    """Replace ``target`` (a folder) by ``staging``: rename the old one away first, so a crash
    leaves either the old or the new table in place, never half of one."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _build_index(vectors: Any, path: Path, nlist: int | None) -> dict[str, Any]:
    from mlsyskit.vector.compat import ann_parameters
    from mlsyskit.vector.ivf import IVFIndex

    n = vectors.shape[0]
    lists = max(1, min(nlist or ann_parameters(n)[0], n))
    index = IVFIndex(EMBED_DIM, lists, metric="dot")
    index.train(vectors, seed=0)
    index.add(vectors)
    index.save(path)
    return {"nlist": lists, "nprobe": ann_parameters(n)[1] if nlist is None else max(1, math.ceil(lists / 8))}


@dataclass
class IngestedCorpus:
    """An ingested folder, in a fixed order (by source, then chunk index): the rows of the IVF
    index's ids."""

    ids: list[str]
    texts: list[str]
    sources: list[str]
    titles: list[str]
    vectors: Any  # float32 (n, 384)
    manifest: dict[str, Any]


def load_ingested(path: str | Path, *, _check_manifest: bool = True) -> IngestedCorpus:
    """Read an :func:`ingest` output folder without Spark (pyarrow): texts and their vectors."""
    import numpy as np
    import pyarrow.parquet as pq

    path = Path(path)
    manifest: dict[str, Any] = {}
    if _check_manifest:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not an ingested folder ({MANIFEST}: {e})") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{path}/{MANIFEST}: not a {FORMAT} manifest")
    try:
        table = pq.read_table(path / CHUNKS, columns=["id", "source", "title", "chunk", "text", "vector"])
    except (OSError, ValueError) as e:
        raise UserError(f"{path}/{CHUNKS}: cannot read ({e})") from None
    table = table.sort_by([("source", "ascending"), ("chunk", "ascending")])
    n = table.num_rows
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != n * EMBED_DIM:
        raise UserError(f"{path}/{CHUNKS}: expected {EMBED_DIM} floats per vector")
    vectors = np.ascontiguousarray(flat.astype(np.float32).reshape(n, EMBED_DIM))
    return IngestedCorpus(
        ids=table.column("id").to_pylist(), texts=table.column("text").to_pylist(),
        sources=table.column("source").to_pylist(), titles=table.column("title").to_pylist(),
        vectors=vectors, manifest=manifest,
    )


def load_index(path: str | Path) -> Any:
    """The IVF index of an ingested folder (ids: rows of :func:`load_ingested`)."""
    from mlsyskit.vector.indexes import load_index as load

    return load(Path(path) / INDEX)
