"""Training and calibration images for the exit heads (`--train builtin:digits|DIR`).

builtin:digits: heads train on its `train` split, thresholds are picked on `calib`; `test` is
never touched (it is what --eval reports on). A folder with train/ and calib/ subfolders is
used the same way; a folder without split subfolders is split deterministically: every fifth
image (in the loader's class round-robin order) is held out for calibration, the rest trains.
The data's class count must match the model's head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from vitopt.errors import ConfigError

HOLDOUT_EVERY = 5


def exit_datasets(spec: str, meta, num_classes: int, limit: Optional[int] = None) -> Tuple[tuple, tuple]:
    """((train images, labels), (calib images, labels)) for `spec`, checked against the head."""
    from vitopt.data.folder import resolve_dataset

    def load(split):
        return resolve_dataset(spec, split, meta.image_size[0], meta.mean, meta.std, meta.in_chans,
                               limit=limit)

    folder = not str(spec).startswith("builtin:")
    if folder and not Path(spec).is_dir():
        raise ConfigError(f"--train {spec}: no such folder; give builtin:digits or a folder of "
                          f"class subfolders (optionally under train/ and calib/)")
    if folder and not (Path(spec) / "train").is_dir():
        images, labels, classes = load(None)
        _check_classes(spec, classes, labels, num_classes)
        held = torch.arange(labels.numel()) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        if held.sum() == 0 or (~held).sum() == 0:
            raise ConfigError(f"--train {spec} has {labels.numel()} images; exits need at least "
                              f"{HOLDOUT_EVERY} (training plus held-out calibration images)")
        return (images[~held], labels[~held]), (images[held], labels[held])
    train_images, train_labels, classes = load("train")
    _check_classes(spec, classes, train_labels, num_classes)
    calib_images, calib_labels, calib_classes = load("calib")
    _check_classes(spec, calib_classes, calib_labels, num_classes)
    return (train_images, train_labels), (calib_images, calib_labels)


def _check_classes(spec, classes, labels: torch.Tensor, num_classes: int) -> None:
    if classes is not None and len(classes) and len(classes) != num_classes:
        raise ConfigError(f"--train {spec} has {len(classes)} classes ({', '.join(map(str, classes[:5]))}"
                          f"{', ...' if len(classes) > 5 else ''}) but the model's head has "
                          f"{num_classes}; give data with the model's classes")
    if labels.numel() and (labels < 0).all():
        raise ConfigError(f"--train {spec} has no class subfolders; thresholds are calibrated on "
                          f"labelled images, so give one subfolder per class")
