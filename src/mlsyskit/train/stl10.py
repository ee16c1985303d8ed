"""STL-10 in its binary release format (`stl10_binary/`, Coates, Ng and Lee 2011).

The release holds ``train_X.bin`` (5,000 images), ``train_y.bin``, ``test_X.bin`` (8,000),
``test_y.bin``, ``class_names.txt`` (and ``unlabeled_X.bin``, not used). Each image is
3 x 96 x 96 uint8 bytes, channel after channel (red, green, blue), each channel stored
COLUMN-major (the format was written from MATLAB); labels are one byte each, 1..10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlsyskit.errors import UserError

SIDE = 96
CHANNELS = 3
IMAGE_BYTES = CHANNELS * SIDE * SIDE
CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
FOLDER = "stl10_binary"
# Per-channel mean and std of the 5,000 training images (pixels scaled to [0, 1]).
MEAN = (0.4467, 0.4398, 0.4066)
STD = (0.2603, 0.2566, 0.2713)


def find_stl10(data_dir: Path | None) -> Path | None:
    """The folder holding train_X.bin: DATA_DIR/stl10_binary, DATA_DIR/stl10/stl10_binary or
    DATA_DIR itself; None when absent."""
    if data_dir is None:
        return None
    for folder in (data_dir / FOLDER, data_dir / "stl10" / FOLDER, data_dir):
        if (folder / "train_X.bin").is_file():
            return folder
    return None


def read_images(path: Path) -> np.ndarray:
    """uint8 (N, 3, 96, 96) images, rows first (the file's column-major channels transposed)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if raw.size == 0 or raw.size % IMAGE_BYTES:
        raise UserError(
            f"{path} holds {raw.size:,} bytes, not a whole number of STL-10 images "
            f"({IMAGE_BYTES:,} bytes each); the file is truncated or not STL-10"
        )
    # (N, C, W, H) as stored -> (N, C, H, W)
    return np.ascontiguousarray(raw.reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 1, 3, 2))


def read_labels(path: Path, count: int) -> np.ndarray:
    """int64 labels 0..9 (the file stores 1..10)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if raw.size != count:
        raise UserError(f"{path} holds {raw.size:,} labels but its images file holds {count:,} images")
    if raw.size and (raw.min() < 1 or raw.max() > len(CLASSES)):
        raise UserError(f"{path} has labels outside 1..{len(CLASSES)} ({int(raw.min())}..{int(raw.max())}); not STL-10")
    return raw.astype(np.int64) - 1


def load_stl10(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from a ``stl10_binary`` folder."""
    out = []
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        for p in (x_path, y_path):
            if not p.is_file():
                raise UserError(f"{p} is missing; an STL-10 folder needs train_X.bin, train_y.bin, test_X.bin, test_y.bin")
        x = read_images(x_path)
        out += [x, read_labels(y_path, len(x))]
    return out[0], out[1], out[2], out[3]
