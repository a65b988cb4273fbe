"""Run a compiled artifact: load it, check it fits this machine, validate inputs, run in chunks.

    rt = vitopt.load("deit.vitopt")
    probs = rt(rt.preprocess(["cat.jpg"]))     # numpy in -> numpy out, torch in -> torch out
    rt.topk(probs[0])                          # [(label, score), ...]

Needs neither torch nor the compiler: only the artifact's backend (and Pillow for preprocess).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from vitopt.artifact import hardware_info, read_manifest
from vitopt.backends import BACKENDS, get_backend
from vitopt.backends.base import Engine
from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError, InputError


def load(path: Union[str, Path], *, threads: Optional[int] = None) -> "Runtime":
    """Load the artifact at `path` (checked: format, file hashes, backend, hardware)."""
    root = Path(path)
    manifest = read_manifest(root)
    backend_name = manifest["backend"].get("name") if isinstance(manifest["backend"], dict) else None
    if backend_name not in BACKENDS:
        raise ArtifactError(f"{root} was built for backend {backend_name!r}, which this vitopt "
                            f"does not know (it has {', '.join(BACKENDS)}); upgrade vitopt or "
                            f"recompile with `vitopt compile --backend ...`")
    backend = get_backend(backend_name)
    ok, reason = backend.available()
    if not ok:
        raise BackendUnavailableError(f"cannot run {root}: {reason}")
    _check_hardware(root, manifest, backend)
    if manifest.get("exits"):  # early exits: one engine per segment (vitopt.segmented)
        from vitopt.segmented import load_segmented
        engine = load_segmented(backend, root, manifest, threads=threads)
    else:
        engine = backend.load(root, sorted(manifest["files"]), precision=manifest["precision"],
                              threads=threads)
    return Runtime(root, manifest, engine)


def _check_hardware(root: Path, manifest: dict, backend) -> None:
    precision = manifest["precision"]
    built_on = (manifest.get("hardware") or {}).get("cpu", "an unknown CPU")
    if precision not in backend.precisions:
        raise ArtifactError(f"{root} records precision {precision!r}, which {backend.name} does "
                            f"not run; recompile with `vitopt compile`")
    ok, reason = backend.supports(precision)
    if not ok:
        raise BackendUnavailableError(f"{root} was built for {precision} on {built_on}, but "
                                      f"{reason}")
    required = (manifest.get("hardware") or {}).get("requires") or []
    here = hardware_info()
    missing = [flag for flag in required if flag not in here["flags"]]
    if missing:
        raise BackendUnavailableError(f"{root} was built on {built_on} for CPUs with "
                                      f"{', '.join(required)}; this CPU ({here['cpu']}) lacks "
                                      f"{', '.join(missing)}. Recompile on this machine.")


class Runtime:
    """A loaded artifact. Call it with images [B,C,H,W] or [C,H,W] (numpy or torch)."""

    def __init__(self, path: Path, manifest: dict, engine: Engine):
        self.path, self.manifest, self.engine = Path(path), manifest, engine
        spec = manifest["input"]
        self.input_shape: Tuple[int, int, int] = tuple(int(v) for v in spec["shape"])
        self.max_batch = int(spec["max_batch"])
        channels = self.input_shape[0]
        self.mean = np.broadcast_to(np.asarray(spec["mean"], np.float32), (channels,))
        self.std = np.broadcast_to(np.asarray(spec["std"], np.float32), (channels,))
        self.output_kind: str = manifest["output"]["kind"]
        self.labels: Optional[List[str]] = manifest["output"].get("labels")

    def __repr__(self) -> str:
        return (f"Runtime({str(self.path)!r}, backend={self.engine.backend}, "
                f"precision={self.manifest['precision']}, input={list(self.input_shape)}, "
                f"max_batch={self.max_batch}, output={self.output_kind})")

    # --- running -------------------------------------------------------------------------
    def __call__(self, images):
        """Outputs for `images`; the same container type (numpy/torch) and float32.

        A single image [C,H,W] gives a single output without the batch axis. Any batch size
        works: batches above the artifact's max_batch run in chunks.
        """
        array, torch_device = self._to_numpy(images)
        single = array.ndim == 3
        if single:
            array = array[None]
        self._check_shape(array)
        outputs = [self.engine.run(array[start:start + self.max_batch])
                   for start in range(0, array.shape[0], self.max_batch)]
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=0)
        if single:
            out = out[0]
        if torch_device is None:
            return out
        import torch

        return torch.from_numpy(np.ascontiguousarray(out)).to(torch_device)

    def _to_numpy(self, images) -> Tuple[np.ndarray, object]:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(images, torch.Tensor):
            if not images.is_floating_point():
                raise InputError(self._dtype_message(str(images.dtype).replace("torch.", "")))
            device = images.device
            return images.detach().to("cpu", torch.float32).numpy(), device
        if not isinstance(images, np.ndarray):
            raise InputError(f"images must be a numpy array or torch tensor [B, C, H, W], got "
                             f"{type(images).__name__}; use rt.preprocess(paths or PIL images)")
        if images.dtype.kind != "f":
            raise InputError(self._dtype_message(str(images.dtype)))
        return images.astype(np.float32, copy=False), None

    def _dtype_message(self, dtype: str) -> str:
        return (f"images must be floating point (normalized float32), got dtype {dtype}; raw "
                f"pixels need rt.preprocess(), which scales and normalizes with the model's "
                f"mean/std")

    def _check_shape(self, array: np.ndarray) -> None:
        channels, height, width = self.input_shape
        expected = f"[B, {channels}, {height}, {width}] or [{channels}, {height}, {width}]"
        if array.ndim != 4:
            raise InputError(f"images must be {expected}, got shape {list(array.shape)}")
        if array.shape[0] < 1:
            raise InputError(f"the batch is empty (shape {list(array.shape)}); pass at least "
                             f"one image")
        if array.shape[1] != channels:
            raise InputError(f"the model takes {channels}-channel images ({expected}), got "
                             f"{array.shape[1]} channels in shape {list(array.shape)}; "
                             f"convert them or use rt.preprocess()")
        if tuple(array.shape[2:]) != (height, width):
            raise InputError(f"the model takes {height}x{width} images ({expected}), got "
                             f"{array.shape[2]}x{array.shape[3]} in shape {list(array.shape)}; "
                             f"resize them or use rt.preprocess()")

    # --- input and output helpers --------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Paths or PIL images (one or a list) -> float32 [N,C,H,W], resized and normalized."""
        from PIL import Image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if not images:
            raise InputError("preprocess got no images; pass a path, a PIL image or a list")
        return np.stack([self._prepare(image) for image in images])

    def _prepare(self, image) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        channels, height, width = self.input_shape
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if channels not in modes:
            raise InputError(f"preprocess handles 1-, 3- and 4-channel models; this one takes "
                             f"{channels} channels: prepare the float32 array yourself")
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as opened:
                    image = opened.convert(modes[channels])
            except FileNotFoundError as exc:
                raise InputError(f"image file {image} does not exist") from exc
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"cannot read {image} as an image ({exc})") from exc
        elif isinstance(image, Image.Image):
            image = image.convert(modes[channels])
        else:
            raise InputError(f"preprocess takes file paths or PIL images, got "
                             f"{type(image).__name__}; pass arrays straight to rt(images)")
        image = image.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(height, width, channels) / 255.0
        pixels = (pixels - self.mean) / self.std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)

    def topk(self, output, k: int = 5) -> Union[List[Tuple[object, float]], List[list]]:
        """Top-k (label or class index, probability), softmax applied to logits.

        `output` [N] (one image) gives one list; [B, N] gives a list per image.
        """
        if self.output_kind not in ("logits", "probabilities"):
            raise ConfigError(f"topk needs a classifier; this artifact outputs "
                              f"{self.output_kind!r}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if hasattr(output, "detach"):
            output = output.detach().float().cpu().numpy()
        scores = np.asarray(output, dtype=np.float64)
        if scores.ndim not in (1, 2):
            raise InputError(f"topk takes outputs [N] or [B, N], got shape {list(scores.shape)}")
        rows = scores[None] if scores.ndim == 1 else scores
        if self.output_kind == "logits":
            rows = np.exp(rows - rows.max(axis=1, keepdims=True))
            rows = rows / rows.sum(axis=1, keepdims=True)
        names = self.labels if self.labels and len(self.labels) == rows.shape[1] else None
        order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        result = [[(names[i] if names else int(i), float(row[i])) for i in idx]
                  for row, idx in zip(rows, order)]
        return result[0] if scores.ndim == 1 else result
