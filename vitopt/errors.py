"""The error hierarchy. Each error carries the exit code the CLI returns for it.

Exit codes (documented in the README):
  0 ok, 1 user error (bad input, config, model), 2 accuracy/numerics check failed,
  3 backend or hardware unavailable.
Messages say what was wrong, with the bad value, and what to do about it.
"""


class VitoptError(Exception):
    """Base of every error vitopt raises on purpose."""

    exit_code = 1


class ConfigError(VitoptError):
    """A bad option, pass config, preset, target or argument."""


class ModelLoadError(VitoptError):
    """A model file that is missing, corrupt, unsafe or of an unknown format."""


class UnsupportedModelError(VitoptError):
    """The model is not an encoder of the shape vitopt lifts (or a variant it does not know)."""


class InputError(VitoptError):
    """Run-time input of the wrong shape, channels, dtype or batch."""


class ArtifactError(VitoptError):
    """An artifact that is missing, corrupt, of another format version, or built for other hardware."""


class LoweringError(VitoptError):
    """The IR could not be lowered to the requested format."""


class NumericsError(VitoptError):
    """A numerical check failed: the IR or an engine does not match its reference."""

    exit_code = 2


class BackendUnavailableError(VitoptError):
    """An engine or the hardware it needs is not available on this machine."""

    exit_code = 3


class EngineLoadError(BackendUnavailableError):
    """A backend built its engine, but the engine cannot be opened on this machine (compile_model
    then tries the target's next backend, unless the backend was asked for by name)."""

    def __init__(self, backend: str, message: str):
        super().__init__(message)
        self.backend = backend
