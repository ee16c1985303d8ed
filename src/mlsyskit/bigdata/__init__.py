"""Big-data pipelines on Spark: n-gram language models, Word2Vec, KMeans, RAG ingestion.

    from mlsyskit.bigdata import spark_session, read_sentences, ngram_counts
    with spark_session("local[2]") as spark:
        stats = kneser_ney_statistics(ngram_counts(read_sentences(spark, "corpus.txt"), 3), 3)
        lm = estimate_kneser_ney(stats)                    # interpolated Kneser-Ney, NgramLM

Names are imported on first use, so `import mlsyskit.bigdata` (and the CLI) never loads pyspark.
"""

from __future__ import annotations

from mlsyskit.lazy import lazy_exports

_EXPORTS = {
    "spark_session": "mlsyskit.bigdata.session",
    "start_session": "mlsyskit.bigdata.session",
    "find_java": "mlsyskit.bigdata.session",
    "LocalCluster": "mlsyskit.bigdata.standalone",
    "tokenize": "mlsyskit.bigdata.text",
    "read_sentences": "mlsyskit.bigdata.text",
    "ngram_counts": "mlsyskit.bigdata.ngram",
    "kneser_ney_statistics": "mlsyskit.bigdata.ngram",
    "estimate_kneser_ney": "mlsyskit.bigdata.ngram",
    "NgramLM": "mlsyskit.bigdata.ngram",
    "run_ngram": "mlsyskit.bigdata.ngram",
    "train_skipgram": "mlsyskit.bigdata.word2vec",
    "train_cbow": "mlsyskit.bigdata.word2vec",
    "WordVectors": "mlsyskit.bigdata.word2vec",
    "run_kmeans": "mlsyskit.bigdata.kmeans",
    "ingest": "mlsyskit.bigdata.ingest",
    "load_ingested": "mlsyskit.bigdata.ingest",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
