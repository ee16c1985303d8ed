"""MLlib KMeans on a table: k chosen by silhouette, segments equal the true blobs, inertia equal
to mlsyskit.vector.kmeans on the same data; outputs written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlsyskit.bigdata.kmeans import elbow_k, run_kmeans
from mlsyskit.errors import UserError


def test_kmeans_finds_the_three_blobs(spark, tmp_path: Path) -> None:
    import pandas as pd

    from mlsyskit.vector import kmeans

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 5.0], [0.0, 10.0, -5.0]])
    labels = np.repeat(np.arange(3), 60)
    x = centers[labels] + rng.normal(scale=0.7, size=(180, 3))
    table = pd.DataFrame({"id": np.arange(180), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": labels, "name": [f"r{i}" for i in range(180)]})
    table.loc[5, "b"] = np.nan  # a row with a missing feature is dropped and counted
    csv = tmp_path / "records.csv"
    table.to_csv(csv, index=False)
    summary = run_kmeans(spark, str(csv), tmp_path / "out", exclude=["id", "label"], k_range=(2, 4), seed=1)
    assert summary["features"] == ["a", "b", "c"] and summary["rows"] == 179 and summary["dropped_rows"] == 1
    assert summary["chosen_k"] == 3 and summary["silhouette_k"] == 3 and summary["elbow_k"] == 3
    assert [r["k"] for r in summary["k_values"]] == [2, 3, 4]
    seg = pd.read_parquet(tmp_path / "out" / "segments.parquet")
    assert len(seg) == 179 and {"id", "label", "name", "segment"} <= set(seg.columns)
    assert seg.groupby("label")["segment"].nunique().max() == 1 and seg["segment"].nunique() == 3
    ours = kmeans(table.drop(index=5)[["a", "b", "c"]].to_numpy(np.float32), 3, "l2", seed=0)
    assert summary["inertia"] == pytest.approx(float(ours.inertia), rel=1e-3)
    assert (tmp_path / "out" / "segments.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "kmeans.json").read_text())["chosen_k"] == 3
    with pytest.raises(UserError, match="no column 'nope'"):
        run_kmeans(spark, str(csv), tmp_path / "bad", features=["nope"])
    with pytest.raises(UserError, match="not numeric"):
        run_kmeans(spark, str(csv), tmp_path / "bad", features=["a", "name"])


def test_elbow_rule() -> None:
    assert elbow_k([2, 3, 4, 5, 6], [100.0, 30.0, 25.0, 22.0, 20.0]) == 3
    assert elbow_k([2, 3], [10.0, 5.0]) == 2
