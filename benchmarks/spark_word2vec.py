"""Word2Vec quality and speed: MLlib skip-gram and our CBOW (data-parallel on Spark, and in one
process) against gensim's skip-gram and CBOW, on the same tokenized Tiny Shakespeare.

    .venv/bin/python benchmarks/spark_word2vec.py             # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/spark_word2vec.py --quick     # 1 epoch

Same settings for all: lowercased tokens (``mlsyskit.bigdata.text``), dimension 100, window
5, min count 5, 5 epochs, learning rate 0.025, negative sampling with 5 noise words (gensim's
and ours; MLlib's skip-gram uses hierarchical softmax, its only option), 2 cores (gensim:
``workers=2``; Spark: ``local[2]``). Quality: the built-in Shakespeare analogy set (3CosAdd,
top-1), and the Spearman correlation with WordSim-353 and SimLex-999 (the copies that ship
with gensim's tests) on the pairs in the vocabulary. Speed: training seconds and words/s (all
training words, before subsampling, times epochs, over the training time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--out", default=str(common.RESULTS / "spark_word2vec.json"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch")
    args = common.parse_with_quick(p, argv, {"epochs": 1})

    import gensim
    import numpy as np
    from gensim.models import Word2Vec as GensimWord2Vec

    from mlsyskit.bigdata.session import start_session
    from mlsyskit.bigdata.text import read_sentences, tokenize
    from mlsyskit.bigdata.word2vec import (
        SHAKESPEARE_ANALOGIES,
        CBOWConfig,
        WordVectors,
        analogy_questions,
        evaluate_analogies,
        evaluate_similarity,
        read_similarity,
        train_cbow,
        train_skipgram,
    )

    source = common.find_file("shakespeare/input.txt", common.default_data_dir(existing_only=True))
    if source is None:
        sys.exit("Tiny Shakespeare not found: set MLSYSKIT_DATA_DIR")
    test_data = Path(gensim.__file__).parent / "test" / "test_data"
    sim_sets = {name: read_similarity(test_data / f) for name, f in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    questions = analogy_questions(SHAKESPEARE_ANALOGIES)
    report: dict[str, Any] = {**common.run_stamp(), **common.platform_info(), "cpus": common.usable_cpus(),
                              "loadavg_start": common.loadavgs(), "packages": common.package_versions(["pyspark", "gensim", "torch"]),
                              "settings": {"dim": args.dim, "window": 5, "min_count": 5, "epochs": args.epochs, "lr": 0.025, "negative": 5}}

    def evaluate(wv: WordVectors) -> dict[str, Any]:
        out = {"analogies": evaluate_analogies(wv, questions)}
        for name, pairs in sim_sets.items():
            out[name] = evaluate_similarity(wv, pairs, lowercase=True)
        out["neighbors"] = {w: [n for n, _ in wv.neighbors(w, 5)] for w in ("king", "love", "death") if w in wv}
        return out

    rows: dict[str, Any] = {}
    sentences_py = [t for t in (tokenize(line, lowercase=True) for line in source.read_text(encoding="utf-8").splitlines()) if t]
    total_words = sum(len(s) for s in sentences_py)
    report["corpus"] = {"sentences": len(sentences_py), "words": total_words}
    for name, sg in (("gensim skip-gram", 1), ("gensim CBOW", 0)):
        t0 = time.perf_counter()
        model = GensimWord2Vec(sentences_py, vector_size=args.dim, window=5, min_count=5, sg=sg, negative=5, hs=0,
                               epochs=args.epochs, alpha=0.025, workers=2, seed=1)
        train_s = time.perf_counter() - t0
        wv = WordVectors(list(model.wv.index_to_key), np.asarray(model.wv.vectors, np.float32))
        rows[name] = {"train_seconds": round(train_s, 2), "words_per_second": round(total_words * args.epochs / train_s, 1),
                      "vocab": len(wv), **evaluate(wv)}
        common.log(f"{name}: {rows[name]['train_seconds']}s, analogies {rows[name]['analogies']['accuracy']}")
    t0 = time.perf_counter()
    spark = start_session("local[2]", app_name="bench-word2vec")
    report["spark_start_s"] = round(time.perf_counter() - t0, 2)
    sentences = read_sentences(spark, str(source), lowercase=True).cache()
    sentences.count()
    wv, info = train_skipgram(spark, sentences, dim=args.dim, window=5, min_count=5, epochs=args.epochs, lr=0.025, seed=1)
    rows["MLlib skip-gram (local[2])"] = {**info, **evaluate(wv)}
    common.log(f"MLlib skip-gram: {info['train_seconds']}s")
    cfg = CBOWConfig(dim=args.dim, window=5, negative=5, epochs=args.epochs, lr=0.025, seed=1)
    wv, info = train_cbow(spark, sentences, min_count=5, config=cfg)
    rows["ours CBOW, data-parallel (local[2])"] = {**info, **evaluate(wv)}
    common.log(f"ours CBOW parallel: {info['train_seconds']}s")
    wv, info = train_cbow(spark, sentences, min_count=5, config=cfg, single_process=True)
    rows["ours CBOW, one process"] = {**info, **evaluate(wv)}
    common.log(f"ours CBOW single: {info['train_seconds']}s")
    spark.stop()
    report["models"] = rows
    report["loadavg_end"] = common.loadavgs()
    out = common.write_json(args.out, report)

    plt = common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(rows)
    a1.barh(names, [rows[n]["words_per_second"] or 0 for n in names], color="tab:blue")
    a1.set_xlabel("training words/s")
    width = 0.27
    ys = np.arange(len(names))
    a2.barh(ys - width, [rows[n]["analogies"]["accuracy"] or 0 for n in names], width, label="analogies (top-1)")
    a2.barh(ys, [rows[n]["wordsim353"]["spearman"] or 0 for n in names], width, label="WordSim-353 Spearman")
    a2.barh(ys + width, [rows[n]["simlex999"]["spearman"] or 0 for n in names], width, label="SimLex-999 Spearman")
    a2.set_yticks(ys, [""] * len(names))
    a2.legend(fontsize=8)
    a2.set_xlabel("quality")
    fig.suptitle(f"Word2Vec on Tiny Shakespeare, {args.epochs} epochs (load {report['loadavg_start'][0]} at start)")
    common.save_figure(fig, Path(out).with_suffix(".png"))
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
