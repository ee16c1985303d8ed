"""Word2Vec on Spark: skip-gram (MLlib) and CBOW (PyTorch, negative sampling, data-parallel).

    sentences = read_sentences(spark, "corpus.txt", lowercase=True)
    sg, _ = train_skipgram(spark, sentences, dim=100)            # Spark MLlib's Word2Vec
    cbow, _ = train_cbow(spark, sentences, dim=100)              # ours, on the partitions
    cbow.neighbors("king", 5); evaluate_analogies(cbow, SHAKESPEARE_ANALOGIES)

* **Skip-gram**: Spark MLlib's ``Word2Vec`` (skip-gram with hierarchical softmax), one
  partition per core.
* **CBOW** (MLlib has none), as word2vec.c and gensim train it: the mean of the input vectors
  of a reduced random window (1..``window`` words each side) predicts the centre word against
  ``negative`` words drawn from the unigram distribution to the power 0.75; frequent words are
  subsampled (``sample`` = 1e-3); the learning rate falls linearly to 1e-4 of its start;
  input vectors start uniform in +-0.5/dim, output vectors at 0. The updates are the exact
  gradients of the negative-sampling loss, applied per batch of ``batch`` positions with
  ``index_add_`` (gensim applies them one position at a time).
  **Data-parallel**: the encoded sentences stay cached on the executors, one block per
  partition; every epoch the driver broadcasts both matrices, each partition trains its own
  copy on its sentences, and the driver averages the copies weighted by the words each
  trained (parameter averaging). ``single_process=True`` trains the same code in the driver.
* **Evaluation**: nearest neighbours by cosine through ``mlsyskit.vector.knn``; analogies
  a : b :: c : ? by 3CosAdd (top-1, the question words excluded), over the questions whose four
  words are in the vocabulary; word similarity as the Spearman correlation between cosine and
  human scores (WordSim-353 / SimLex-999 layout).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsyskit.errors import UserError

# Analogy relations that Tiny Shakespeare's vocabulary covers (lowercase): each pair is
# (x, y) with the same relation; questions are x1 : y1 :: x2 : y2 for two different pairs.
SHAKESPEARE_ANALOGIES: dict[str, list[tuple[str, str]]] = {
    "gender": [("king", "queen"), ("lord", "lady"), ("man", "woman"), ("father", "mother"), ("son", "daughter"),
               ("brother", "sister"), ("husband", "wife"), ("he", "she"), ("his", "her"), ("sir", "madam"),
               ("duke", "duchess"), ("boy", "girl"), ("uncle", "aunt"), ("prince", "princess"), ("master", "mistress"),
               ("gentleman", "gentlewoman"), ("nephew", "niece"), ("men", "women")],
    "plural": [("lord", "lords"), ("king", "kings"), ("man", "men"), ("friend", "friends"), ("hand", "hands"),
               ("eye", "eyes"), ("heart", "hearts"), ("word", "words"), ("day", "days"), ("brother", "brothers"),
               ("son", "sons"), ("enemy", "enemies"), ("thing", "things"), ("tear", "tears"), ("soldier", "soldiers"),
               ("head", "heads"), ("year", "years"), ("life", "lives")],
    "past": [("speak", "spoke"), ("come", "came"), ("give", "gave"), ("know", "knew"), ("take", "took"),
             ("see", "saw"), ("make", "made"), ("tell", "told"), ("die", "died"), ("bring", "brought"),
             ("think", "thought"), ("fall", "fell"), ("stand", "stood"), ("hear", "heard")],
    "pronoun": [("i", "me"), ("he", "him"), ("she", "her"), ("we", "us"), ("they", "them"), ("thou", "thee")],
}


def analogy_questions(relations: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str, str, str, str]]:
    """(section, a, b, c, d) for every two different pairs of a relation."""
    out = []
    for section, pairs in relations.items():
        for a, b in pairs:
            for c, d in pairs:
                if (a, b) != (c, d) and len({a, b, c, d}) == 4:
                    out.append((section, a, b, c, d))
    return out


def read_analogies(path: str | Path) -> list[tuple[str, str, str, str, str]]:
    """Questions from a file in the Google layout: ``: section`` lines, then ``a b c d``."""
    section, out = "", []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        words = line.split()
        if len(words) != 4:
            raise UserError(f"{path}, line {lineno}: expected four words 'a b c d'")
        out.append((section, *words))
    if not out:
        raise UserError(f"{path}: no analogy question")
    return out


def read_similarity(path: str | Path) -> list[tuple[str, str, float]]:
    """(word1, word2, score) from a WordSim-353 / SimLex-999 style file (tab or space
    separated, the score in the third column; header and comment lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 3 or line.startswith("#"):
            continue
        try:
            out.append((parts[0].strip(), parts[1].strip(), float(parts[2])))
        except ValueError:
            continue  # a header line
    if not out:
        raise UserError(f"{path}: no 'word1 word2 score' line")
    return out


@dataclass
class WordVectors:
    """Words and their vectors (float32, one row per word)."""

    words: list[str]
    vectors: Any
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _unit: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._index = {w: i for i, w in enumerate(self.words)}

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def __len__(self) -> int:
        return len(self.words)

    def vector(self, word: str) -> Any:
        return self.vectors[self._index[word]]

    def unit(self) -> Any:
        import numpy as np

        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = (self.vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        return self._unit

    def similarity(self, a: str, b: str) -> float:
        u = self.unit()
        return float(u[self._index[a]] @ u[self._index[b]])

    def _nearest(self, queries: Any, k: int, exclude: Sequence[set[int]]) -> list[list[tuple[int, float]]]:
        import numpy as np

        from mlsyskit.vector import knn

        q = np.asarray(queries, np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        kk = min(len(self.words), k + max((len(e) for e in exclude), default=0))
        dist, idx = knn(self.unit(), q, kk, metric="cosine")
        out = []
        for row_d, row_i, ex in zip(dist, idx, exclude, strict=True):
            hits = [(int(i), 1.0 - float(d)) for d, i in zip(row_d, row_i, strict=True) if int(i) not in ex]
            out.append(hits[:k])
        return out

    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` words nearest to ``word`` by cosine (mlsyskit.vector.knn), the word excluded."""
        if word not in self._index:
            raise UserError(f"{word!r} is not in the vocabulary")
        i = self._index[word]
        hits = self._nearest(self.vectors[i : i + 1], k, [{i}])[0]
        return [(self.words[j], round(s, 4)) for j, s in hits]

    def save_text(self, path: str | Path) -> Path:
        """The word2vec text format: ``n d``, then ``word v1 .. vd`` per line."""
        path = Path(path)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{len(self.words)} {self.vectors.shape[1]}\n")
            for w, v in zip(self.words, self.vectors, strict=True):
                f.write(w + " " + " ".join(f"{x:.6g}" for x in v) + "\n")
        return path


def evaluate_analogies(wv: WordVectors, questions: Sequence[tuple[str, str, str, str, str]]) -> dict[str, Any]:
    """3CosAdd top-1 accuracy over the questions whose words are all in the vocabulary."""
    covered = [q for q in questions if all(w in wv for w in q[1:])]
    if not covered:
        return {"questions": len(questions), "covered": 0, "accuracy": None, "sections": {}}
    u = wv.unit()
    idx = wv._index
    queries = [u[idx[b]] - u[idx[a]] + u[idx[c]] for _, a, b, c, _ in covered]
    hits = wv._nearest(queries, 1, [{idx[a], idx[b], idx[c]} for _, a, b, c, _ in covered])
    correct: dict[str, list[int]] = {}
    for (section, *_, d), h in zip(covered, hits, strict=True):
        correct.setdefault(section, []).append(int(bool(h) and wv.words[h[0][0]] == d))
    total = sum(sum(v) for v in correct.values())
    return {
        "questions": len(questions), "covered": len(covered), "accuracy": round(total / len(covered), 4),
        "sections": {s: {"covered": len(v), "accuracy": round(sum(v) / len(v), 4)} for s, v in correct.items()},
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(v: Sequence[float]) -> Any:
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # ties share their mean rank
            tie = v == val
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def evaluate_similarity(wv: WordVectors, pairs: Sequence[tuple[str, str, float]], lowercase: bool = True) -> dict[str, Any]:
    """Spearman correlation of cosine similarity with the human scores, on covered pairs."""
    norm = (lambda w: w.lower()) if lowercase else (lambda w: w)
    covered = [(norm(a), norm(b), s) for a, b, s in pairs if norm(a) in wv and norm(b) in wv]
    if len(covered) < 3:
        return {"pairs": len(pairs), "covered": len(covered), "spearman": None}
    rho = spearman([wv.similarity(a, b) for a, b, _ in covered], [s for *_, s in covered])
    return {"pairs": len(pairs), "covered": len(covered), "spearman": round(rho, 4)}


# -- vocabulary and encoding --------------------------------------------------------------------
def build_vocab(sentences: Any, min_count: int) -> tuple[list[str], list[int], int]:
    """(words by falling count then alphabetically, their counts, all tokens) on Spark."""
    from pyspark.sql import functions as F

    counts = sentences.select(F.explode("tokens").alias("w")).groupBy("w").count()
    rows = counts.toPandas()
    total = int(rows["count"].sum()) if len(rows) else 0
    rows = rows[rows["count"] >= min_count].sort_values(["count", "w"], ascending=[False, True])
    if len(rows) < 2:
        raise UserError(f"fewer than 2 words occur at least --min-count={min_count} times; lower --min-count or give more text")
    return rows["w"].tolist(), [int(c) for c in rows["count"].tolist()], total


def _encode_partition(vocab: dict[str, int]) -> Any:
    def encode(rows: Iterable[Any]) -> Any:
        import numpy as np

        ids: list[int] = []
        ends: list[int] = []
        for row in rows:
            ids.extend(vocab[w] for w in row.tokens if w in vocab)
            ends.append(len(ids))
        yield (np.asarray(ids, np.int32), np.asarray(ends, np.int64))

    return encode


# -- CBOW with negative sampling ----------------------------------------------------------------
@dataclass
class CBOWConfig:
    dim: int = 100
    window: int = 5
    negative: int = 5
    epochs: int = 5
    lr: float = 0.025
    min_lr_ratio: float = 1e-4
    sample: float = 1e-3
    batch: int = 256
    seed: int = 1


def _noise_table(counts: Sequence[int], size: int = 1_000_000) -> Any:
    """word2vec's table: each word id repeated in proportion to count^0.75."""
    import numpy as np

    p = np.asarray(counts, np.float64) ** 0.75
    p /= p.sum()
    return np.repeat(np.arange(len(counts), dtype=np.int64), np.maximum(1, np.round(p * size).astype(np.int64)))


def _keep_probability(counts: Sequence[int], sample: float) -> Any:
    """word2vec's subsampling: P(keep) = (sqrt(f / (s T)) + 1) (s T) / f, capped at 1."""
    import numpy as np

    c = np.asarray(counts, np.float64)
    threshold = sample * c.sum()
    if sample <= 0:
        return np.ones_like(c)
    return np.minimum(1.0, (np.sqrt(c / threshold) + 1) * threshold / c)


def train_cbow_block(
    w_in: Any, w_out: Any, ids: Any, ends: Any, cfg: CBOWConfig, keep: Any, table: Any,
    lr_from: float, lr_to: float, seed: int,
) -> int:
    """One pass of CBOW over one block of encoded sentences, updating ``w_in`` and ``w_out``
    (torch float32 tensors) in place. The learning rate falls linearly from ``lr_from`` to
    ``lr_to`` over the block. Returns the words of the block (before subsampling)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    n = len(ids)
    if n == 0:
        return 0
    sent = np.repeat(np.arange(len(ends)), np.diff(np.concatenate([[0], ends])))
    kept = rng.random(n) < keep[ids]
    ids_k, sent_k = ids[kept], sent[kept]
    m = len(ids_k)
    if m < 2:
        return n
    win = cfg.window
    offsets = np.array([o for o in range(-win, win + 1) if o != 0])
    w_in_t, w_out_t = w_in, w_out
    for start in range(0, m, cfg.batch):
        pos = np.arange(start, min(m, start + cfg.batch))
        b = rng.integers(1, win + 1, size=len(pos))  # reduced window per position
        ctx = pos[:, None] + offsets[None, :]
        valid = (ctx >= 0) & (ctx < m) & (np.abs(offsets)[None, :] <= b[:, None])
        ctx_c = np.clip(ctx, 0, m - 1)
        valid &= sent_k[ctx_c] == sent_k[pos][:, None]
        has = valid.any(1)
        if not has.any():
            continue
        pos, ctx_c, valid = pos[has], ctx_c[has], valid[has]
        lr = lr_from + (lr_to - lr_from) * (start / m)
        centre = torch.from_numpy(ids_k[pos].astype(np.int64))
        ctx_ids = torch.from_numpy(ids_k[ctx_c].astype(np.int64))
        mask = torch.from_numpy(valid.astype(np.float32))
        count = mask.sum(1, keepdim=True)
        h = (w_in_t[ctx_ids] * mask[:, :, None]).sum(1) / count  # (B, d): mean of the context
        negs = torch.from_numpy(table[rng.integers(0, len(table), size=(len(pos), cfg.negative))])
        targets = torch.cat([centre[:, None], negs], 1)  # (B, 1 + K)
        labels = torch.zeros(targets.shape, dtype=torch.float32)
        labels[:, 0] = 1.0
        out_vecs = w_out_t[targets]  # (B, 1 + K, d)
        scores = torch.bmm(out_vecs, h[:, :, None]).squeeze(2)
        g = (labels - torch.sigmoid(scores)) * lr  # gradient ascent on log-likelihood, times lr
        grad_h = (g[:, :, None] * out_vecs).sum(1)  # (B, d)
        w_out_t.index_add_(0, targets.reshape(-1), (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        # word2vec adds the context's whole gradient to every context word (not divided)
        sel = mask.bool()
        w_in_t.index_add_(0, ctx_ids[sel], grad_h[:, None, :].expand(-1, ctx_ids.shape[1], -1)[sel])
    return n


def _init_weights(vocab_size: int, dim: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    w_in = ((rng.random((vocab_size, dim), dtype=np.float32) - 0.5) / dim).astype(np.float32)
    return w_in, np.zeros((vocab_size, dim), np.float32)


def _lr_at(cfg: CBOWConfig, fraction: float) -> float:
    return cfg.lr * max(cfg.min_lr_ratio, 1.0 - fraction)


def train_cbow(
    spark: Any,
    sentences: Any,
    *,
    min_count: int = 5,
    config: CBOWConfig | None = None,
    single_process: bool = False,
    progress: Any = None,
) -> tuple[WordVectors, dict[str, Any]]:
    """CBOW with negative sampling (module docstring), data-parallel over the partitions of
    ``sentences`` (a DataFrame with ``tokens``) or, with ``single_process``, in the driver."""
    import numpy as np
    import torch

    cfg = config or CBOWConfig()
    t0 = time.perf_counter()
    words, counts, _ = build_vocab(sentences, min_count)
    vocab = {w: i for i, w in enumerate(words)}
    keep = _keep_probability(counts, cfg.sample)
    table = _noise_table(counts)
    w_in, w_out = _init_weights(len(words), cfg.dim, cfg.seed)
    sc = spark.sparkContext
    # one block of encoded sentences per core: the unit of data parallelism
    parts = sc.defaultParallelism
    blocks = sentences.select("tokens").repartition(parts).rdd.mapPartitions(_encode_partition(vocab))
    prep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if single_process:
        parts = blocks.collect()
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
        ends = np.concatenate([p[1] + off for p, off in zip(parts, offsets, strict=True)]) if parts else np.zeros(0, np.int64)
        tin, tout = torch.from_numpy(w_in), torch.from_numpy(w_out)
        words_trained = 0
        torch.set_num_threads(1)
        for epoch in range(cfg.epochs):
            with _step(progress, f"CBOW epoch {epoch + 1}/{cfg.epochs} in one process"):
                lr_from, lr_to = _lr_at(cfg, epoch / cfg.epochs), _lr_at(cfg, (epoch + 1) / cfg.epochs)
                words_trained += train_cbow_block(tin, tout, ids, ends, cfg, keep, table, lr_from, lr_to, cfg.seed * 1000 + epoch)
        partitions = 1
    else:
        blocks = blocks.cache()
        partitions = blocks.getNumPartitions()
        words_trained = 0
        for epoch in range(cfg.epochs):
            with _step(progress, f"CBOW epoch {epoch + 1}/{cfg.epochs} on {partitions} partitions"):
                b_in, b_out = sc.broadcast(w_in), sc.broadcast(w_out)
                lr_from, lr_to = _lr_at(cfg, epoch / cfg.epochs), _lr_at(cfg, (epoch + 1) / cfg.epochs)
                results = blocks.mapPartitionsWithIndex(_epoch_task(b_in, b_out, cfg, keep, table, lr_from, lr_to, epoch)).collect()
                total = sum(r[0] for r in results)
                if total == 0:
                    raise UserError("no training words left after the vocabulary cut")
                w_in = sum(r[1] * (r[0] / total) for r in results).astype(np.float32)
                w_out = sum(r[2] * (r[0] / total) for r in results).astype(np.float32)
                words_trained += total
                b_in.unpersist()
                b_out.unpersist()
        blocks.unpersist()
    train_s = time.perf_counter() - t1
    wv = WordVectors(words, np.asarray(w_in, np.float32))
    return wv, {
        "algorithm": "cbow", "vocab": len(words), "train_words": words_trained // cfg.epochs,
        "epochs": cfg.epochs, "partitions": partitions, "single_process": single_process,
        "prepare_seconds": round(prep_s, 3), "train_seconds": round(train_s, 3),
        "words_per_second": round(words_trained / train_s, 1) if train_s > 0 else None,
    }


def _epoch_task(b_in: Any, b_out: Any, cfg: CBOWConfig, keep: Any, table: Any, lr_from: float, lr_to: float, epoch: int) -> Any:
    def task(index: int, blocks: Iterable[Any]) -> Any:
        import numpy as np
        import torch

        torch.set_num_threads(1)  # one task per core
        tin, tout = torch.from_numpy(np.array(b_in.value)), torch.from_numpy(np.array(b_out.value))
        n = 0
        for ids, ends in blocks:
            n += train_cbow_block(tin, tout, ids, ends, cfg, keep, table, lr_from, lr_to, (cfg.seed * 1000 + epoch) * 1000 + index)
        yield (n, tin.numpy(), tout.numpy())

    return task


def _step(progress: Any, what: str) -> Any:
    import contextlib

    return progress.step(what) if progress is not None else contextlib.nullcontext()


# -- skip-gram with MLlib -----------------------------------------------------------------------
def train_skipgram(
    spark: Any,
    sentences: Any,
    *,
    dim: int = 100,
    window: int = 5,
    min_count: int = 5,
    epochs: int = 5,
    lr: float = 0.025,
    seed: int = 1,
    partitions: int | None = None,
    progress: Any = None,
) -> tuple[WordVectors, dict[str, Any]]:
    """Skip-gram with Spark MLlib's ``Word2Vec`` (hierarchical softmax), ``partitions``
    (default: one per core) trained in parallel."""
    import numpy as np
    from pyspark.ml.feature import Word2Vec

    parts = partitions or spark.sparkContext.defaultParallelism
    t0 = time.perf_counter()
    w2v = Word2Vec(vectorSize=dim, windowSize=window, minCount=min_count, maxIter=epochs, stepSize=lr,
                   seed=seed, numPartitions=parts, inputCol="tokens", outputCol="vector")
    data = sentences.select("tokens").cache()
    total = data.selectExpr("sum(size(tokens)) as n").collect()[0]["n"] or 0
    with _step(progress, f"skip-gram (MLlib), {epochs} epochs on {parts} partitions"):
        t1 = time.perf_counter()
        model = w2v.fit(data)
        train_s = time.perf_counter() - t1
    pdf = model.getVectors().toPandas()
    data.unpersist()
    if len(pdf) < 2:
        raise UserError(f"fewer than 2 words occur at least --min-count={min_count} times")
    order = np.argsort(pdf["word"].to_numpy(), kind="stable")
    words = [pdf["word"].iloc[i] for i in order]
    vectors = np.stack([np.asarray(pdf["vector"].iloc[i].toArray(), np.float32) for i in order])
    return WordVectors(words, vectors), {
        "algorithm": "skipgram", "vocab": len(words), "train_words": int(total), "epochs": epochs,
        "partitions": parts, "train_seconds": round(train_s, 3),
        "prepare_seconds": round(time.perf_counter() - t0 - train_s, 3),
        "words_per_second": round(total * epochs / train_s, 1) if train_s > 0 else None,
    }


# -- the pipeline behind `mlsyskit spark word2vec` ----------------------------------------------
def run_word2vec(spark: Any, args: Any, progress: Any = None) -> dict[str, Any]:
    """Train the chosen models, save them, evaluate them; returns the summary (``args``: the
    parsed flags of ``mlsyskit spark word2vec``)."""
    from mlsyskit.bigdata.io import prepare_out, spark_errors, write_json
    from mlsyskit.bigdata.text import read_sentences

    out = prepare_out(args.out)
    questions = read_analogies(args.analogies) if args.analogies else analogy_questions(SHAKESPEARE_ANALOGIES)
    pairs = read_similarity(args.similarity) if args.similarity else None
    terms = [t.strip() for t in (args.neighbors or "").split(",") if t.strip()]
    with spark_errors(f"--train {args.train}"):
        sentences = read_sentences(spark, args.train, args.lowercase).cache()
        n_sentences = sentences.count()
    if n_sentences == 0:
        raise UserError(f"--train {args.train}: the corpus holds no token (empty or only whitespace)")
    algos = ["skipgram", "cbow"] if args.algorithm == "both" else [args.algorithm]
    models: dict[str, Any] = {}
    for algo in algos:
        if algo == "skipgram":
            wv, info = train_skipgram(spark, sentences, dim=args.dim, window=args.window, min_count=args.min_count,
                                      epochs=args.epochs, lr=args.lr, seed=args.seed, progress=progress)
        else:
            cfg = CBOWConfig(dim=args.dim, window=args.window, negative=args.negative, epochs=args.epochs, lr=args.lr, seed=args.seed)
            wv, info = train_cbow(spark, sentences, min_count=args.min_count, config=cfg,
                                  single_process=args.single_process, progress=progress)
        info["vectors"] = str(wv.save_text(out / f"vectors-{algo}.txt"))
        info["analogies"] = evaluate_analogies(wv, questions)
        if pairs is not None:
            info["similarity"] = evaluate_similarity(wv, pairs, lowercase=args.lowercase)
        info["neighbors"] = {t: wv.neighbors(t, 8) for t in terms if t in wv}
        models[algo] = info
    sentences.unpersist()
    summary = {"train": args.train, "sentences": n_sentences, "dim": args.dim, "window": args.window,
               "min_count": args.min_count, "models": models}
    write_json(out / "summary.json", summary)
    return summary
