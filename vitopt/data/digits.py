"""The built-in dataset `builtin:digits`: scikit-learn's bundled digits as small RGB images.

This is the data of vitopt's *accuracy proxy* (see design.md §5): 8×8 handwritten digits,
not ImageNet. It ships inside scikit-learn, so nothing is downloaded.

Preprocessing: pixel values 0..16 are scaled to [0, 1], upsampled to 32×32 with bilinear
interpolation (align_corners=False), replicated to 3 channels, then normalized with the
fixed constants DIGITS_MEAN / DIGITS_STD, i.e. x_norm = (x - 0.5) / 0.5 in [-1, 1].

The split is deterministic (stratified by class, fixed seed SPLIT_SEED) and the parts are
disjoint; together they cover all 1797 images:

    train  1257 images (~70 %)  -- training only
    calib   180 images (~10 %)  -- calibration, picking thresholds
    test    360 images (~20 %)  -- held out: never used for training or calibration
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from vitopt.errors import ConfigError

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DIGITS_LABELS = [str(i) for i in range(10)]
DIGITS_IMAGE_SIZE = 32
DIGITS_SPLITS = ("train", "calib", "test")
SPLIT_SEED = 0
SPLIT_SIZES = {"train": 1257, "calib": 180, "test": 360}
_RAW_MAX = 16.0  # sklearn digits pixels are integers 0..16


def _check_split(split: str) -> None:
    if split not in DIGITS_SPLITS:
        raise ConfigError(
            f"unknown split {split!r} for builtin:digits; use one of {', '.join(DIGITS_SPLITS)}")


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict:
    """Indices of each part: stratified by label, fixed seed, disjoint and exhaustive."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    all_idx = np.arange(len(labels))
    rest, test = train_test_split(all_idx, test_size=SPLIT_SIZES["test"],
                                  stratify=labels, random_state=SPLIT_SEED)
    train, calib = train_test_split(rest, test_size=SPLIT_SIZES["calib"],
                                    stratify=labels[rest], random_state=SPLIT_SEED)
    return {"train": np.sort(train), "calib": np.sort(calib), "test": np.sort(test)}


def split_indices(split: str) -> np.ndarray:
    """Indices into sklearn's `load_digits()` arrays of one part (a copy)."""
    _check_split(split)
    return _split_indices()[split].copy()


@functools.lru_cache(maxsize=1)
def _all_images() -> tuple:
    """All 1797 images as unnormalized float32 [N, 3, 32, 32] in [0, 1], and labels int64 [N]."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.from_numpy(raw.images.astype(np.float32) / _RAW_MAX).unsqueeze(1)
    x = F.interpolate(x, size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), mode="bilinear",
                      align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(raw.target.astype(np.int64))
    return x, y


def normalize(images: torch.Tensor, mean=DIGITS_MEAN, std=DIGITS_STD) -> torch.Tensor:
    """(images - mean) / std per channel; images are [N, C, H, W] float."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def load_digits_split(split: str, normalized: bool = True) -> tuple:
    """Return (images float32 [N, 3, 32, 32], labels int64 [N]) of one part of builtin:digits.

    `split` is "train", "calib" or "test". Images are normalized with DIGITS_MEAN/DIGITS_STD
    unless `normalized=False`, which gives values in [0, 1]. Returns fresh tensors.
    """
    _check_split(split)
    x, y = _all_images()
    idx = torch.from_numpy(_split_indices()[split])
    images = x.index_select(0, idx)
    if normalized:
        images = normalize(images)
    return images.contiguous(), y.index_select(0, idx).contiguous()
