"""The demo data: scikit-learn's 8x8 handwritten digits, upscaled to 16x16, in [-1, 1].

`load_digits` (UCI optical digits, 1797 images, 10 classes) ships inside scikit-learn, so
nothing is downloaded. Split: a fixed, seeded, class-stratified hold-out of 20 % per class
(360 images); the rest (1437) is the training set of both the diffusion model and the
classifier.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


def _require_sklearn():
    try:
        from sklearn.datasets import load_digits  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the fastdiff demo needs scikit-learn for its data: pip install 'fastdiff[demo]'") from e
    return load_digits


def load_all() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float32 in [-1, 1], and their labels (N,) int64."""
    data = _require_sklearn()()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # pixel values 0..16
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return x.contiguous(), torch.from_numpy(data.target.astype(np.int64))


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION):
    """(train_idx, heldout_idx): per class, a seeded permutation; the first round(f * n) held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(heldout_fraction * idx.size))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_split(split: str):
    """`split` in {"train", "heldout"}: (images (N, 1, 16, 16) in [-1, 1], labels (N,))."""
    x, y = load_all()
    tr, he = split_indices(y.numpy())
    if split == "train":
        idx = tr
    elif split == "heldout":
        idx = he
    else:
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    idx = torch.from_numpy(idx)
    return x[idx], y[idx]
