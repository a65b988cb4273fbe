"""Load images for vitopt: image-folder datasets, single image files, and dataset specs.

A dataset folder holds one subfolder per class (like torchvision's ImageFolder, without
depending on torchvision); class names are the subfolder names in sorted order and the
label of an image is the index of its subfolder. A folder with image files and no class
subfolders is accepted as an *unlabeled* set: its labels are all -1 and class_names is [].

Every image is decoded with Pillow, converted to RGB (channels=3) or grayscale (channels=1),
resized so that its shorter side is `image_size` (bilinear, antialiased), center-cropped to
image_size × image_size, scaled to [0, 1], then normalized per channel: (x - mean) / std.

`resolve_dataset` turns a spec into tensors: "builtin:digits" (vitopt's accuracy proxy data,
see vitopt.data.digits) or a folder path. A folder may have split subfolders named
train/calib/test, each laid out as above; otherwise the whole folder is one part.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitopt.errors import ConfigError, InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FEW_IMAGES = 8  # below this many images a folder gives a warning: numbers on it mean little
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("builtin:digits",)
SPLIT_NAMES = ("train", "calib", "test")


# ---------------------------------------------------------------------------- helpers

def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") \
        and path.suffix.lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image_file(p))


def _class_dirs(folder: Path) -> list:
    """Visible subfolders of `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _per_channel(values, channels: int, what: str) -> tuple:
    """`values` as a tuple of `channels` floats (a single number is repeated)."""
    if values is None:
        values = (0.5,)
    elif isinstance(values, (int, float)):
        values = (float(values),)
    else:
        try:
            values = tuple(float(v) for v in values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what} {values!r} must be a number or a list of numbers") from exc
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(
            f"{what} has {len(values)} values {values} but the images have {channels} channels; "
            f"give one value or {channels}")
    if what == "std" and not all(v > 0 for v in values):
        raise ConfigError(f"std {values} must be positive in every channel")
    return values


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 1:
        raise ConfigError(f"image_size {image_size!r} must be a positive integer, e.g. 224")
    return int(image_size)


def _check_channels(channels) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"channels {channels!r} is not supported; use 3 (RGB) or 1 (grayscale)")
    return channels


def _normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images - m) / s).contiguous()


def _read_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image file as unnormalized float32 [C, S, S] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(
            f"cannot read image {str(path)!r} ({exc}); remove it or replace it with a valid "
            f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} file") from exc
    width, height = img.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _warn_if_few(count: int, where: str) -> None:
    if count < FEW_IMAGES:
        warnings.warn(
            f"{where} has only {count} image(s); accuracy measured on fewer than {FEW_IMAGES} "
            f"images means little, add more images", stacklevel=3)


def _round_robin(per_class: list, limit: int | None) -> list:
    """Pick at most `limit` (path, label) pairs, taking classes in turn so they stay balanced."""
    if limit is None:
        return [item for items in per_class for item in items]
    picked, depth = [], 0
    while len(picked) < limit and any(depth < len(items) for items in per_class):
        for items in per_class:
            if depth < len(items) and len(picked) < limit:
                picked.append(items[depth])
        depth += 1
    return sorted(picked, key=lambda item: (item[1], str(item[0])))


def _check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit {limit!r} must be a positive integer or None (no limit)")


# ---------------------------------------------------------------------------- public API

def load_images(paths, image_size: int, mean=None, std=None, channels: int = 3) -> torch.Tensor:
    """Load single image files into one normalized float32 batch [N, channels, S, S].

    `paths` is a path or a list of paths (e.g. `vitopt run photo.jpg`). `mean` and `std` are
    per-channel (one number is repeated; None means 0.5).
    """
    image_size, channels = _check_image_size(image_size), _check_channels(channels)
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image paths given; pass at least one image file")
    for path in paths:
        if not path.exists():
            raise InputError(f"image file {str(path)!r} does not exist; check the path")
        if path.is_dir():
            raise InputError(
                f"{str(path)!r} is a folder, not an image file; pass image files, or load the "
                f"folder with load_image_folder")
    images = torch.stack([_read_image(p, image_size, channels) for p in paths])
    return _normalize(images, mean, std)


def load_image_folder(path, image_size: int, mean=None, std=None, channels: int = 3,
                      limit: int | None = None) -> tuple:
    """Load a folder of class subfolders: returns (images, labels, class_names).

    images: normalized float32 [N, channels, S, S]; labels: int64 [N] (index into class_names).
    A folder of image files without class subfolders gives labels -1 and class_names [].
    `limit` caps the number of images, taken from the classes in turn. Warns below 8 images.
    """
    image_size, channels = _check_image_size(image_size), _check_channels(channels)
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    _check_limit(limit)
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"dataset folder {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise ConfigError(
            f"dataset {str(folder)!r} is not a folder; give a folder with one subfolder of "
            f"images per class (or use load_images for single files)")
    class_dirs = _class_dirs(folder)
    if class_dirs:
        class_names = [d.name for d in class_dirs]
        per_class = [[(f, label) for f in _image_files(d)] for label, d in enumerate(class_dirs)]
        empty = [d.name for d, items in zip(class_dirs, per_class) if not items]
        if all(not items for items in per_class):
            raise ConfigError(
                f"dataset folder {str(folder)!r} has class subfolders {class_names} but no "
                f"images in them; add {'/'.join(IMAGE_EXTENSIONS)} files")
        if empty:
            warnings.warn(f"class subfolder(s) {empty} of {str(folder)!r} hold no images",
                          stacklevel=2)
    else:
        class_names = []
        per_class = [[(f, -1) for f in _image_files(folder)]]
        if not per_class[0]:
            raise ConfigError(
                f"dataset folder {str(folder)!r} is empty: no class subfolders and no images; "
                f"add one subfolder per class holding {'/'.join(IMAGE_EXTENSIONS)} files")
    items = _round_robin(per_class, limit)
    _warn_if_few(len(items), f"dataset folder {str(folder)!r}")
    images = torch.stack([_read_image(p, image_size, channels) for p, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return _normalize(images, mean, std), labels, class_names


def _resolve_digits(split, image_size, mean, std, channels, limit) -> tuple:
    from vitopt.data.digits import DIGITS_LABELS, DIGITS_SPLITS, load_digits_split

    if split is None:
        raise ConfigError(f"builtin:digits needs a split; use one of {', '.join(DIGITS_SPLITS)}")
    images, labels = load_digits_split(split, normalized=False)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=image_size < images.shape[-1])
        images = images.clamp(0.0, 1.0)
    images = images[:, :channels]
    return _normalize(images, mean, std), labels, list(DIGITS_LABELS)


def _split_folder(folder: Path, split) -> Path:
    """The folder of one split: folder/<split> if the folder has split subfolders, else itself."""
    if split is None or not folder.is_dir():
        return folder
    present = [name for name in SPLIT_NAMES if (folder / name).is_dir()]
    if (folder / split).is_dir():
        return folder / split
    if present:
        raise ConfigError(
            f"dataset folder {str(folder)!r} has split subfolders {present} but no {split!r}; "
            f"add {str(folder / split)!r} or ask for one of {present}")
    return folder


def resolve_dataset(spec, split, image_size: int, mean=None, std=None, channels: int = 3,
                    limit: int | None = None) -> tuple:
    """Turn a dataset spec into (images, labels, class_names).

    spec: "builtin:digits" (split picks train/calib/test; images are resized when image_size is
    not 32) or a folder path (folder/<split> is used when the folder has split subfolders).
    mean/std: the model's normalization, per channel (None means 0.5).
    """
    image_size, channels = _check_image_size(image_size), _check_channels(channels)
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    _check_limit(limit)
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        if spec != "builtin:digits":
            raise ConfigError(
                f"unknown built-in dataset {spec!r}; known: {', '.join(BUILTIN_DATASETS)}, "
                f"or give a folder path")
        return _resolve_digits(split, image_size, mean, std, channels, limit)
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(
            f"dataset spec {spec!r} must be 'builtin:digits' or a folder path")
    folder = _split_folder(Path(spec), split)
    return load_image_folder(folder, image_size, mean, std, channels=channels, limit=limit)
