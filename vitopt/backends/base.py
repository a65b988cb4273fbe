"""What every backend provides: build engine files from ONNX, load them back as a runnable Engine.

A backend is stateless and cheap to construct; it imports its engine library only inside its
methods, so `import vitopt` works when the library is missing and `available()` can say why.

Lifecycle:  backend.available() -> backend.build(onnx, out_dir, ...) -> file names in out_dir
            (the artifact stores them) -> backend.load(out_dir, files, ...) -> Engine.run(images)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from vitopt.errors import ArtifactError, BackendUnavailableError, ConfigError


class Engine(ABC):
    """A loaded, ready-to-run engine: float32 images [B,C,H,W] -> float32 output [B,...]."""

    backend: str = ""
    precision: str = "fp32"

    @abstractmethod
    def run(self, images: np.ndarray) -> np.ndarray:
        """Run one batch. The caller (the Runtime) has validated shape and dtype."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)


class Backend(ABC):
    """One inference engine. Subclasses set the class attributes and the four methods."""

    name: str = ""
    module: str = ""  # the Python module it imports, named in messages
    pip: str = ""  # what to pip install when it is missing
    precisions: Tuple[str, ...] = ("fp32",)

    @abstractmethod
    def available(self) -> Tuple[bool, str]:
        """(True, "") when usable here, else (False, why, with the pip command that fixes it)."""

    @abstractmethod
    def version(self) -> str:
        """The engine library's version (recorded in the artifact)."""

    @abstractmethod
    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, max_batch: int,
              threads: Optional[int] = None) -> List[str]:
        """Build engine files from `onnx_path` into `out_dir`; return their names."""

    @abstractmethod
    def load(self, out_dir: Path, files: Sequence[str], *, precision: str,
             threads: Optional[int] = None) -> Engine:
        """Load the engine built into `out_dir` (`files` as build returned them)."""

    def check_opens(self, out_dir: Path, files: Sequence[str], *, precision: str, device: str,
                    image_shape: Sequence[int]) -> None:
        """Raise EngineLoadError when the built engine cannot be opened on this machine without
        risking this process (compile_model calls it before load, then tries the target's next
        backend). Nothing to check by default; AOTInductor opens CUDA packages in a child."""

    def supports(self, precision: str) -> Tuple[bool, str]:
        """Whether this machine can run `precision` on this backend, and why not."""
        if precision not in self.precisions:
            return False, (f"{self.name} does not run precision {precision!r}; it runs "
                           f"{', '.join(self.precisions)}")
        return True, ""

    # --- helpers shared by the backends --------------------------------------------------
    def _import_error(self, exc: Exception) -> Tuple[bool, str]:
        return False, (f"the {self.name} backend needs the {self.module!r} package, which "
                       f"cannot be imported ({exc}); install it with `pip install {self.pip}`")

    def require(self, precision: Optional[str] = None) -> None:
        """Raise BackendUnavailableError unless the backend (and `precision`) work here."""
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailableError(reason)
        if precision is not None:
            if precision not in self.precisions:
                raise ConfigError(f"{self.name} does not run precision {precision!r}; choose "
                                  f"one of {', '.join(self.precisions)}")
            ok, reason = self.supports(precision)
            if not ok:
                raise BackendUnavailableError(reason)

    @staticmethod
    def _check_max_batch(max_batch: int) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")

    @staticmethod
    def _check_threads(threads: Optional[int]) -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a positive integer or None (engine default), "
                              f"got {threads!r}")

    def _pick(self, out_dir: Path, files: Sequence[str], suffix: str) -> Path:
        matches = [f for f in files if f.endswith(suffix)]
        if len(matches) != 1:
            raise ArtifactError(f"the {self.name} engine needs exactly one {suffix} file, found "
                                f"{matches or 'none'} in {out_dir}; recompile with `vitopt compile`")
        return Path(out_dir) / matches[0]
