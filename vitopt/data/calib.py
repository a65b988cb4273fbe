"""Calibration images for passes that need data (quantize_int8): load, check, or synthesize.

`calibration_context(spec, ...)` turns `--calib builtin:digits|DIR` into a PassContext holding
normalized images (the `calib` split of the builtin data, or DIR/calib when DIR has split
subfolders). `check_calibration(images, in_chans, image_size)` refuses what would give a
silently wrong scale: too few images, wrong channels or size, non-finite values, constant
images. Without --calib, `synthetic_calibration` gives random images and warns: ranges
calibrated on noise are not the ranges of real images.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from vitopt.errors import ConfigError

MIN_CALIB_IMAGES = 2
FEW_CALIB_IMAGES = 16  # below this, a warning: ranges from a handful of images are noisy
DEFAULT_CALIB_LIMIT = 128


def calibration_context(spec: Optional[str], image_size: Sequence[int], in_chans: int, mean, std,
                        limit: Optional[int] = DEFAULT_CALIB_LIMIT):
    """A PassContext with the calibration images of `spec` (None: no data, passes decide)."""
    from vitopt.data.folder import resolve_dataset
    from vitopt.pipeline import PassContext

    if spec is None:
        return PassContext()
    if image_size[0] != image_size[1]:
        raise ConfigError(f"calibration loads square images; this model takes {list(image_size)}")
    images, _, _ = resolve_dataset(spec, "calib", image_size[0], mean, std, in_chans, limit=limit)
    check_calibration(images, in_chans, image_size, where=str(spec))
    return PassContext(calib=images, calib_source=str(spec))


def check_calibration(images, in_chans: int, image_size: Sequence[int], where: str = "the "
                      "calibration data") -> torch.Tensor:
    """Raise ConfigError for calibration images that would give garbage scales; warn when few."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (f"a {images.dtype} tensor of shape {list(images.shape)}"
               if isinstance(images, torch.Tensor) else type(images).__name__)
        raise ConfigError(f"calibration images from {where} must be a float tensor [N, C, H, W]; "
                          f"got {got}")
    n, c, h, w = images.shape
    if c != in_chans:
        raise ConfigError(f"calibration images from {where} have {c} channel(s) but the model takes "
                          f"{in_chans}; give {'RGB' if in_chans == 3 else 'grayscale'} images")
    if (h, w) != tuple(image_size):
        raise ConfigError(f"calibration images from {where} are {h}x{w} but the model takes "
                          f"{image_size[0]}x{image_size[1]}")
    if n < MIN_CALIB_IMAGES:
        raise ConfigError(f"calibration needs at least {MIN_CALIB_IMAGES} images and {where} gives "
                          f"{n}; a range from one image does not describe the data (use "
                          f"{FEW_CALIB_IMAGES} or more)")
    if not torch.isfinite(images).all():
        raise ConfigError(f"calibration images from {where} contain NaN or inf values")
    flat = images.reshape(n, -1)
    if bool((flat.amax(1) == flat.amin(1)).all()):
        raise ConfigError(f"every calibration image from {where} is constant (one value); "
                          f"calibrating on them gives meaningless ranges")
    if n < FEW_CALIB_IMAGES:
        warnings.warn(f"calibrating on only {n} images from {where}; ranges from fewer than "
                      f"{FEW_CALIB_IMAGES} images are noisy", stacklevel=3)
    return images


def synthetic_calibration(in_chans: int, image_size: Sequence[int], count: int = 32) -> torch.Tensor:
    """Random normal images (already 'normalized'), with a warning saying what that means."""
    warnings.warn("no calibration data given (--calib): calibrating int8 ranges on synthetic random "
                  "images; accuracy on real images may suffer. Pass --calib builtin:digits or a "
                  "folder of representative images", stacklevel=3)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(count, in_chans, *image_size, generator=gen)
