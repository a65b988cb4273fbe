"""Tests of vitopt.data.digits and vitopt.data.folder: splits, shapes, folder loading, errors."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vitopt.data.digits import (DIGITS_IMAGE_SIZE, DIGITS_LABELS, DIGITS_MEAN, DIGITS_SPLITS,
                                DIGITS_STD, SPLIT_SIZES, load_digits_split, split_indices)
from vitopt.data.folder import load_image_folder, load_images, resolve_dataset
from vitopt.errors import ConfigError, InputError


def _png(path, color, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path):
    """Two classes, 5 images each, of mixed size, mode and format."""
    root = tmp_path / "ds"
    for i in range(5):
        _png(root / "cat" / f"c{i}.png", (255, 255, 255))
        _png(root / "dog" / f"d{i}.jpg", (0, 0, 0), size=(9, 30))
    _png(root / "cat" / "gray.bmp", 255, mode="L")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------- digits

def test_digits_splits_are_disjoint_exhaustive_and_sized():
    parts = {name: set(split_indices(name).tolist()) for name in DIGITS_SPLITS}
    assert all(len(parts[n]) == SPLIT_SIZES[n] for n in DIGITS_SPLITS)
    assert not parts["train"] & parts["calib"]
    assert not parts["train"] & parts["test"]
    assert not parts["calib"] & parts["test"]
    assert set.union(*parts.values()) == set(range(1797))


def test_digits_split_is_deterministic_and_shaped():
    for name in DIGITS_SPLITS:
        x1, y1 = load_digits_split(name)
        x2, y2 = load_digits_split(name)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (SPLIT_SIZES[name], 3, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
        assert x1.dtype == torch.float32 and y1.dtype == torch.int64
        assert torch.equal(x1[:, 0], x1[:, 1]) and torch.equal(x1[:, 0], x1[:, 2])
        assert x1.min() >= -1.0 and x1.max() <= 1.0
        assert set(y1.tolist()) == set(range(10))


def test_digits_normalization_constants():
    assert len(DIGITS_MEAN) == len(DIGITS_STD) == 3
    assert DIGITS_LABELS == [str(i) for i in range(10)]
    raw, _ = load_digits_split("calib", normalized=False)
    norm, _ = load_digits_split("calib")
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    assert torch.allclose((raw - 0.5) / 0.5, norm)


def test_digits_test_split_is_stratified():
    _, y = load_digits_split("test")
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_unknown_split():
    with pytest.raises(ConfigError, match="valid"):
        load_digits_split("valid")


# ---------------------------------------------------------------------------- folders

def test_load_image_folder(class_folder):
    x, y, names = load_image_folder(class_folder, 16, mean=0.5, std=0.5)
    assert names == ["cat", "dog"]
    assert x.shape == (11, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0] * 6 + [1] * 5
    assert torch.allclose(x[y == 0], torch.ones(1))  # white -> (1 - 0.5) / 0.5
    assert torch.allclose(x[y == 1], -torch.ones(1), atol=0.02)  # black (jpeg) -> -1


def test_load_image_folder_grayscale_and_per_channel_norm(class_folder):
    x, _, _ = load_image_folder(class_folder, 8, mean=[0.0], std=[1.0], channels=1)
    assert x.shape == (11, 1, 8, 8)
    x3, _, _ = load_image_folder(class_folder, 8, mean=(0.0, 0.5, 1.0), std=(1.0, 1.0, 1.0))
    assert torch.allclose(x3[0, :, 0, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_load_image_folder_limit_is_balanced(class_folder):
    with pytest.warns(UserWarning, match="only 4"):
        _, y, _ = load_image_folder(class_folder, 8, limit=4)
    assert sorted(y.tolist()) == [0, 0, 1, 1]


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(8):
        _png(tmp_path / f"{i}.webp", (10 * i, 0, 0))
    x, y, names = load_image_folder(tmp_path, 4)
    assert x.shape == (8, 3, 4, 4) and names == [] and (y == -1).all()


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        load_image_folder(tmp_path / "empty", 8)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="no\\s+images"):
        load_image_folder(tmp_path / "noimg", 8)
    file = _png(tmp_path / "one.png", (0, 0, 0))
    with pytest.raises(ConfigError, match="not a folder"):
        load_image_folder(file, 8)


def test_unreadable_image(tmp_path):
    for i in range(8):
        _png(tmp_path / "a" / f"{i}.png", (0, 0, 0))
    (tmp_path / "a" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_image_folder(tmp_path, 8)


def test_bad_options(class_folder):
    with pytest.raises(ConfigError, match="channels"):
        load_image_folder(class_folder, 8, mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="image_size"):
        load_image_folder(class_folder, 0)
    with pytest.raises(ConfigError, match="std"):
        load_image_folder(class_folder, 8, std=0)
    with pytest.raises(ConfigError, match="channels 4"):
        load_image_folder(class_folder, 8, channels=4)


def test_few_images_warns(tmp_path):
    _png(tmp_path / "a" / "x.png", (0, 0, 0))
    with pytest.warns(UserWarning, match="only 1 image"):
        load_image_folder(tmp_path, 8)


def test_load_images(tmp_path):
    one = _png(tmp_path / "a.png", (255, 0, 0), size=(40, 20))
    two = _png(tmp_path / "b.jpeg", (0, 0, 255))
    x = load_images([one, two], 10, mean=0.5, std=0.5)
    assert x.shape == (2, 3, 10, 10)
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    assert load_images(str(one), 10).shape == (1, 3, 10, 10)
    with pytest.raises(InputError, match="does not exist"):
        load_images(tmp_path / "missing.jpg", 10)
    with pytest.raises(InputError, match="folder"):
        load_images(tmp_path, 10)


# ---------------------------------------------------------------------------- specs

def test_resolve_builtin_digits():
    x, y, names = resolve_dataset("builtin:digits", "test", 32, DIGITS_MEAN, DIGITS_STD)
    ref_x, ref_y = load_digits_split("test")
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and names == DIGITS_LABELS
    big, _, _ = resolve_dataset("builtin:digits", "calib", 48, (0.4, 0.4, 0.4), 0.2, limit=7)
    assert big.shape == (7, 3, 48, 48)
    one, _, _ = resolve_dataset("builtin:digits", "calib", 32, 0.5, 0.5, channels=1)
    assert one.shape == (180, 1, 32, 32)


def test_resolve_errors():
    with pytest.raises(ConfigError, match="builtin:cifar"):
        resolve_dataset("builtin:cifar", "test", 32)
    with pytest.raises(ConfigError, match="split"):
        resolve_dataset("builtin:digits", "val", 32)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_dataset("/no/such/folder", "test", 32)


def test_resolve_folder_splits(tmp_path):
    for split, color in (("calib", (255, 255, 255)), ("test", (0, 0, 0))):
        for i in range(8):
            _png(tmp_path / split / "k" / f"{i}.png", color)
    x, y, names = resolve_dataset(tmp_path, "test", 8, 0.5, 0.5)
    assert names == ["k"] and x.shape[0] == 8 and torch.allclose(x, -torch.ones(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _, _ = resolve_dataset(str(tmp_path), "calib", 8, 0.5, 0.5)
    assert torch.allclose(x, torch.ones(1))
    with pytest.raises(ConfigError, match="train"):
        resolve_dataset(tmp_path, "train", 8)


def test_resolve_plain_folder_ignores_split(class_folder):
    x, y, names = resolve_dataset(class_folder, "test", 8, 0.5, 0.5)
    assert names == ["cat", "dog"] and x.shape[0] == 11
    assert np.array_equal(y.numpy(), np.array([0] * 6 + [1] * 5))
