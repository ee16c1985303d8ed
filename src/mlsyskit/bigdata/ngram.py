"""N-gram language models: counts on Spark, interpolated Kneser-Ney, ARPA files, perplexity.

    sentences = read_sentences(spark, "corpus.txt")                # mlsyskit.bigdata.text
    stats = kneser_ney_statistics(ngram_counts(sentences, 3), 3)   # Spark jobs
    lm = estimate_kneser_ney(stats)                                # NgramLM, in the driver
    lm.write_arpa("model.arpa"); lm = NgramLM.read_arpa("model.arpa")
    lm.perplexity([["to", "be", "or"]]); lm.generate(random.Random(0))

**Sentences and padding.** Each sentence (a line) is padded with ``order - 1`` ``<s>`` on the
left and one ``</s>`` on the right, and every k-gram (k = 1..order) of the padded sentence that
ends in a word or ``</s>`` is counted on Spark (one shuffle for all orders, no Python per row).
The counts then go to the driver (Arrow), which computes the continuation counts and the
model: the model must fit in the driver's memory, as with KenLM's or NLTK's estimation.
``<s>`` is never predicted, only context (probability 0, ``-99`` in ARPA, as KenLM and SRILM
write it); so every counted lower-order n-gram has a word before it somewhere, and each
context's probabilities sum to 1.

**Interpolated Kneser-Ney** (Kneser and Ney 1995; Chen and Goodman 1998), in the form NLTK's
``KneserNeyInterpolated`` computes, so that both give the same probabilities (tested to 1e-9):

    p_k(w | h) = max(a(h w) - D_k, 0) / T(h) + D_k * F(h) / T(h) * p_{k-1}(w | h')

where h' is h without its first word; at the highest order a(h w) is the count c(h w); at
lower orders it is the continuation count N1+(. h w), the number of distinct words seen before
``h w``; T(h) is the sum of a(h w) over w and F(h) the number of distinct words seen after h.
A context never seen gives p_{k-1} unchanged. The unigram level interpolates with the uniform
distribution over the vocabulary (with ``<unk>``) so that unseen words keep a probability:
p_1(w) = max(a(w) - D_1, 0) / T + D_1 * |{w: a(w) > 0}| / T / |V| (with D_1 = 0 this is NLTK's
unigram, which gives unseen words 0).

**Discounts**: one per order, by default the standard estimate D_k = n1 / (n1 + 2 n2) from the
number of k-grams whose (adjusted) count a is 1 and 2 (Ney, Essen and Kneser 1994); a fixed
``discount`` as NLTK's (0.1 by default there) can be given instead.

**ARPA.** An interpolated model is exactly a back-off model: every counted n-gram gets its
probability p_k(w | h) and every context its back-off weight D_k F(h) / T(h), so
p(w | h) = P(h w) if listed, else bow(h) * p(w | h'). :meth:`NgramLM.write_arpa` writes the
standard ARPA text format (log10 values), which KenLM, SRILM and others read.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsyskit.bigdata.text import BOS, EOS, UNK
from mlsyskit.errors import UserError

LOG0 = -99.0  # ARPA's log10 of probability 0


# -- counting on Spark --------------------------------------------------------------------------
def ngram_counts(sentences: Any, order: int) -> Any:
    """Counts of all k-grams, k = 1..order, of the padded sentences that do not end in
    ``<s>``: a DataFrame (``order`` int, ``ngram`` string: tokens joined by one space,
    ``count`` long). MLlib's ``NGram`` (compiled Scala) makes the k-grams of each sentence;
    one explode and one aggregation count all orders together."""
    from pyspark.ml.feature import NGram
    from pyspark.sql import functions as F

    _check_order(order)
    df = sentences.select(F.concat(F.array_repeat(F.lit(BOS), order - 1), F.col("tokens"), F.array(F.lit(EOS))).alias("padded"))
    for k in range(1, order + 1):
        df = NGram(n=k, inputCol="padded", outputCol=f"g{k}").transform(df)
    grams = df.select(F.explode(F.concat(*[F.col(f"g{k}") for k in range(1, order + 1)])).alias("ngram"))
    grams = grams.where(~((F.col("ngram") == BOS) | F.col("ngram").endswith(" " + BOS)))  # <s> is context only
    counts = grams.groupBy("ngram").count()
    return counts.select((F.size(F.split("ngram", " ")) ).alias("order"), "ngram", "count")


def _check_order(order: int) -> None:
    if not isinstance(order, int) or order < 1 or order > 10:
        raise UserError(f"--order must be between 1 and 10, got {order}")


@dataclass
class KNStatistics:
    """What Kneser-Ney needs: per order, the n-grams with their adjusted counts a (raw at the
    highest order, continuation counts below), and the count-of-counts."""

    order: int
    ngrams: dict[int, tuple[list[str], list[int]]]  # k -> (ngrams, a)
    count_of_counts: dict[int, tuple[int, int]]  # k -> (n1, n2) of a
    train_tokens: int
    sentences: int


def kneser_ney_statistics(counts: Any, order: int) -> KNStatistics:
    """The counts brought to the driver (Arrow), then the continuation counts
    N1+(. h w) = the number of distinct (k+1)-grams ending in "h w", the adjusted counts, the
    count-of-counts and the corpus size (vectorized in pandas)."""
    pdf = counts.toPandas()
    return statistics_from_table(pdf["order"].to_numpy(), pdf["ngram"], pdf["count"].to_numpy(), order)


def statistics_from_table(orders: Any, grams: Any, raw: Any, order: int) -> KNStatistics:
    """:class:`KNStatistics` from a table of (order, ngram, count) rows."""
    import numpy as np
    import pandas as pd

    table = pd.DataFrame({"order": np.asarray(orders, np.int64), "ngram": pd.Series(grams, dtype=object), "count": np.asarray(raw, np.int64)})
    higher = table[table["order"] >= 2]
    suffix = higher["ngram"].str.split(" ", n=1).str[1]
    cont = pd.DataFrame({"order": higher["order"].to_numpy() - 1, "ngram": suffix.to_numpy()}).value_counts()
    ngrams: dict[int, tuple[list[str], list[int]]] = {}
    coc: dict[int, tuple[int, int]] = {}
    for k in range(1, order + 1):
        part = table[table["order"] == k]
        names = part["ngram"].tolist()
        if k == order:
            a = part["count"].to_numpy()
        else:
            ck = cont.xs(k, level="order") if k in cont.index.get_level_values("order") else pd.Series(dtype=np.int64)
            a = ck.reindex(names).fillna(0).to_numpy().astype(np.int64)
        ngrams[k] = (names, [int(x) for x in a])
        coc[k] = (int((a == 1).sum()), int((a == 2).sum()))
    uni = table[table["order"] == 1]
    tokens = int(uni.loc[~uni["ngram"].isin([BOS, EOS]), "count"].sum())
    sentences = int(uni.loc[uni["ngram"] == EOS, "count"].sum())
    return KNStatistics(order, ngrams, coc, tokens, sentences)


def counts_from_sentences(sentences: Iterable[Sequence[str]], order: int) -> dict[int, dict[str, int]]:
    """The same counts as :func:`ngram_counts`, in one Python process (the baseline, and the
    reference for tests): ``{k: {ngram: count}}``."""
    _check_order(order)
    from collections import Counter

    counters = {k: Counter() for k in range(1, order + 1)}
    for tokens in sentences:
        padded = [BOS] * (order - 1) + list(tokens) + [EOS]
        for k in range(1, order + 1):
            counters[k].update(" ".join(padded[i : i + k]) for i in range(max(0, order - k), len(padded) - k + 1))
    return {k: dict(c) for k, c in counters.items()}


def statistics_from_counts(counts: dict[int, dict[str, int]], order: int) -> KNStatistics:
    """:class:`KNStatistics` from in-memory counts (the single-process path)."""
    orders = [k for k in range(1, order + 1) for _ in counts[k]]
    grams = [g for k in range(1, order + 1) for g in counts[k]]
    raw = [c for k in range(1, order + 1) for c in counts[k].values()]
    return statistics_from_table(orders, grams, raw, order)


# -- the model ----------------------------------------------------------------------------------
def standard_discount(n1: int, n2: int) -> float:
    """Ney, Essen and Kneser's D = n1 / (n1 + 2 n2); 0.5 when there is neither."""
    return n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5


def estimate_kneser_ney(
    stats: KNStatistics, discount: float | None = None, unigram_discount: float | None = None
) -> NgramLM:
    """The interpolated Kneser-Ney model of ``stats`` (module docstring), in back-off form.

    ``discount``: one fixed D for orders 2..N (default: the standard estimate per order);
    ``unigram_discount``: D_1 (default: the standard estimate; 0 gives NLTK's unigram)."""
    order = stats.order
    for name, d in (("discount", discount), ("unigram_discount", unigram_discount)):
        if d is not None and not 0 <= d < 1:
            raise UserError(f"{name} must be in [0, 1), got {d}")
    discounts: dict[int, float] = {}
    for k in range(1, order + 1):
        fixed = unigram_discount if k == 1 else discount
        discounts[k] = fixed if fixed is not None else standard_discount(*stats.count_of_counts.get(k, (0, 0)))
    probs: dict[int, dict[str, float]] = {}
    bows: dict[int, dict[str, float]] = {}
    # unigrams: interpolated with the uniform distribution over the vocabulary (+ <unk>)
    grams, a = stats.ngrams[1]
    if not grams:
        raise UserError("the training corpus holds no token")
    vocab = set(grams) | {UNK}  # what can be predicted: every word, </s> and <unk>, never <s>
    total = sum(a)
    d1 = discounts[1]
    seen = sum(1 for x in a if x > 0)
    if total == 0:  # order 1 with no count cannot happen; keep the uniform distribution
        uniform_mass, total = 1.0, 1
    else:
        uniform_mass = d1 * seen / total
    p1 = {g: max(x - d1, 0.0) / total for g, x in zip(grams, a, strict=True)}
    p1[UNK] = 0.0
    probs[1] = {g: p + uniform_mass / len(vocab) for g, p in p1.items()}
    for k in range(2, order + 1):
        d = discounts[k]
        grams, a = stats.ngrams[k]
        ctx_total: dict[str, int] = {}
        ctx_types: dict[str, int] = {}
        split = [g.rsplit(" ", 1) for g in grams]
        for (ctx, _), x in zip(split, a, strict=True):
            ctx_total[ctx] = ctx_total.get(ctx, 0) + x
            ctx_types[ctx] = ctx_types.get(ctx, 0) + 1
        gamma = {ctx: d * ctx_types[ctx] / t for ctx, t in ctx_total.items() if t > 0}
        lower = probs[k - 1]
        pk: dict[str, float] = {}
        for g, (ctx, word), x in zip(grams, split, a, strict=True):
            t = ctx_total[ctx]
            tail = ctx.split(" ", 1)[1] + " " + word if k > 2 else word
            p_lower = lower[tail]
            pk[g] = max(x - d, 0.0) / t + gamma[ctx] * p_lower if t > 0 else p_lower
        probs[k] = pk
        bows[k - 1] = gamma
    # Contexts made of <s> only ("<s>", "<s> <s>") are never predicted, so never counted, but
    # ARPA keeps a context's back-off weight on its own entry: list them with probability 0.
    if order > 1:
        probs[1][BOS] = 0.0
    for k, bk in bows.items():
        for ctx in bk:
            probs[k].setdefault(ctx, 0.0)
    log_probs = {k: {g: _log10(p) for g, p in pk.items()} for k, pk in probs.items()}
    log_bows = {k: {g: _log10(b) for g, b in bk.items()} for k, bk in bows.items()}
    return NgramLM(order, log_probs, log_bows, discounts=discounts, train_tokens=stats.train_tokens)


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else LOG0


@dataclass
class NgramLM:
    """A back-off n-gram model: log10 probabilities of listed n-grams and log10 back-off
    weights of contexts, keyed by the n-gram's tokens joined by one space (as in ARPA)."""

    order: int
    log_probs: dict[int, dict[str, float]]
    log_bows: dict[int, dict[str, float]]
    discounts: dict[int, float] = field(default_factory=dict)
    train_tokens: int = 0
    _followers: dict[str, list[tuple[str, float]]] | None = field(default=None, repr=False)

    @property
    def vocab(self) -> list[str]:
        """The unigrams, in ARPA order."""
        return sorted(self.log_probs[1])

    def logprob(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context); words outside the vocabulary are ``<unk>``."""
        uni = self.log_probs[1]
        word = word if word in uni else UNK
        ctx = [t if t in uni else UNK for t in list(context)[-(self.order - 1):]] if self.order > 1 else []
        backoff = 0.0
        for n in range(len(ctx), -1, -1):
            hist = ctx[len(ctx) - n :]
            key = " ".join([*hist, word])
            p = self.log_probs[n + 1].get(key)
            if p is not None:
                return p + backoff
            if n:
                backoff += self.log_bows.get(n, {}).get(" ".join(hist), 0.0)
        return LOG0  # <unk> missing from a model read from a file that lacks it

    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        return 10.0 ** self.logprob(word, context)

    def sentence_logprob(self, tokens: Sequence[str]) -> tuple[float, int]:
        """(log10 probability, predicted tokens) of one sentence: its words and ``</s>``."""
        history = [BOS] * (self.order - 1)
        total = 0.0
        for w in [*tokens, EOS]:
            total += self.logprob(w, history)
            history.append(w)
        return total, len(tokens) + 1

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> tuple[float, int, int]:
        """(perplexity over every word and each sentence's ``</s>``, words, OOV words)."""
        logp, n, words, oov = 0.0, 0, 0, 0
        uni = self.log_probs[1]
        for tokens in sentences:
            lp, m = self.sentence_logprob(tokens)
            logp, n = logp + lp, n + m
            words += len(tokens)
            oov += sum(1 for t in tokens if t not in uni)
        if n == 0:
            raise UserError("the evaluation text holds no token")
        return 10.0 ** (-logp / n), words, oov

    # -- generation ------------------------------------------------------------------------------
    def _follower_index(self) -> dict[str, list[tuple[str, float]]]:
        if self._followers is None:
            index: dict[str, list[tuple[str, float]]] = {}
            for k in range(2, self.order + 1):
                for gram, lp in self.log_probs[k].items():
                    ctx, w = gram.rsplit(" ", 1)
                    index.setdefault(ctx, []).append((w, lp))
            self._followers = index
        return self._followers

    def distribution(self, context: Sequence[str]) -> dict[str, float]:
        """p(w | context) for every word of the vocabulary (back-off form, exact)."""
        uni = self.log_probs[1]
        ctx = [t if t in uni else UNK for t in list(context)[-(self.order - 1):]] if self.order > 1 else []
        dist = {w: 10.0 ** lp for w, lp in uni.items()}
        followers = self._follower_index()
        for n in range(1, len(ctx) + 1):
            hist = " ".join(ctx[len(ctx) - n :])
            bow = 10.0 ** self.log_bows.get(n, {}).get(hist, 0.0)
            listed = followers.get(hist, [])
            if bow != 1.0:
                dist = {w: p * bow for w, p in dist.items()}
            for w, lp in listed:
                dist[w] = 10.0 ** lp
        return dist

    def generate(self, rng: random.Random, max_tokens: int = 30, prompt: Sequence[str] = ()) -> list[str]:
        """Sample tokens after ``prompt`` until ``</s>`` or ``max_tokens`` (``<s>`` and
        ``<unk>`` are never drawn)."""
        history = [BOS] * (self.order - 1) + list(prompt)
        out: list[str] = []
        for _ in range(max_tokens):
            dist = self.distribution(history)
            words = [w for w in dist if w not in (BOS, UNK)]
            w = rng.choices(words, weights=[dist[x] for x in words])[0]
            if w == EOS:
                break
            out.append(w)
            history.append(w)
        return out

    # -- ARPA -----------------------------------------------------------------------------------
    def write_arpa(self, path: str | Path) -> Path:
        """Write the model in ARPA format (log10 probabilities and back-off weights)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("\\data\\\n")
                for k in range(1, self.order + 1):
                    f.write(f"ngram {k}={len(self.log_probs[k])}\n")
                for k in range(1, self.order + 1):
                    f.write(f"\n\\{k}-grams:\n")
                    bows = self.log_bows.get(k, {})
                    for gram in sorted(self.log_probs[k]):
                        bow = bows.get(gram)
                        lp = _fmt(self.log_probs[k][gram])
                        f.write(f"{lp}\t{gram}\t{_fmt(bow)}\n" if bow is not None else f"{lp}\t{gram}\n")
                f.write("\n\\end\\\n")
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def read_arpa(cls, path: str | Path) -> NgramLM:
        """Read an ARPA file (ours or another tool's)."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        expected: dict[int, int] = {}
        probs: dict[int, dict[str, float]] = {}
        bows: dict[int, dict[str, float]] = {}
        section = None
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if line == "\\data\\":
                section = 0
            elif line == "\\end\\":
                break
            elif line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
                probs[section], bows[section] = {}, {}
            elif section == 0 and line.startswith("ngram "):
                k, n = line[6:].split("=")
                expected[int(k)] = int(n)
            elif section:
                parts = line.split("\t") if "\t" in line else line.split()
                if "\t" not in line:  # space-separated: logp w1 .. wk [bow]
                    parts = [parts[0], " ".join(parts[1 : 1 + section]), *parts[1 + section :]]
                if len(parts) < 2 or len(parts[1].split(" ")) != section:
                    raise UserError(f"{path}, line {lineno}: not a {section}-gram entry")
                probs[section][parts[1]] = float(parts[0])
                if len(parts) > 2:
                    bows[section][parts[1]] = float(parts[2])
            else:
                raise UserError(f"{path}, line {lineno}: not an ARPA file")
        if not expected or set(expected) != set(probs):
            raise UserError(f"{path}: not an ARPA file (no \\data\\ section or missing n-gram sections)")
        for k, n in expected.items():
            if len(probs[k]) != n:
                raise UserError(f"{path}: the header announces {n} {k}-grams, the file has {len(probs[k])}")
        order = max(expected)
        return cls(order, probs, {k: b for k, b in bows.items() if b})


def _fmt(x: float) -> str:
    return f"{x:.10g}"


# -- the pipeline behind `mlsyskit spark ngram` -------------------------------------------------
def run_ngram(
    spark: Any,
    train: str,
    order: int,
    out: str | Path,
    *,
    eval_path: str | None = None,
    lowercase: bool = False,
    discount: float | None = None,
    samples: int = 3,
    sample_tokens: int = 30,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Count on Spark, estimate Kneser-Ney, write ``model.arpa`` and ``summary.json`` to
    ``out``, evaluate on ``eval_path`` and draw ``samples`` sentences. Returns the summary."""
    import contextlib
    import time

    from mlsyskit.bigdata.io import prepare_out, spark_errors, write_json
    from mlsyskit.bigdata.text import read_sentences

    _check_order(order)
    out_dir = prepare_out(out)
    step = progress.step if progress is not None else (lambda what: contextlib.nullcontext())
    t0 = time.perf_counter()
    with spark_errors(f"--train {train}"), step(f"counting 1..{order}-grams on Spark"):
        stats = kneser_ney_statistics(ngram_counts(read_sentences(spark, train, lowercase), order), order)
    if stats.train_tokens == 0:
        raise UserError(f"--train {train}: the corpus holds no token (empty or only whitespace)")
    count_s = time.perf_counter() - t0
    with step("estimating Kneser-Ney and writing ARPA"):
        lm = estimate_kneser_ney(stats, discount=discount)
        arpa = lm.write_arpa(out_dir / "model.arpa")
    summary: dict[str, Any] = {
        "order": order,
        "vocab": sum(1 for w in lm.log_probs[1] if w not in (BOS, EOS, UNK)),
        "train_tokens": stats.train_tokens,
        "train_sentences": stats.sentences,
        "ngrams": {str(k): len(v) for k, v in lm.log_probs.items()},
        "discounts": {str(k): round(d, 6) for k, d in lm.discounts.items()},
        "eval_tokens": 0,
        "eval_oov": 0,
        "perplexity": None,
    }
    if eval_path is not None:
        with spark_errors(f"--eval {eval_path}"), step("perplexity on the held-out text"):
            sentences = [list(r.tokens) for r in read_sentences(spark, eval_path, lowercase).collect()]
            if not sentences:
                raise UserError(f"--eval {eval_path}: the text holds no token")
            ppl, words, oov = lm.perplexity(sentences)
        summary.update(eval_tokens=words, eval_oov=oov, perplexity=round(ppl, 6))
    rng = random.Random(seed)
    summary["samples"] = [" ".join(lm.generate(rng, sample_tokens)) for _ in range(samples)]
    summary["count_seconds"] = round(count_s, 3)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["arpa"] = str(arpa)
    write_json(out_dir / "summary.json", summary)
    return summary
