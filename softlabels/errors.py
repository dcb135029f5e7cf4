"""Exception hierarchy: every deliberate error is a :class:`SoftLabelsError`, most also the matching
built-in; each message names the problem and the fix, on one line (docs/ERRORS.md).
"""

from __future__ import annotations

__all__ = ["SoftLabelsError", "StoreError", "StoreNotFound", "NotAStore", "UnsupportedFormat", "CorruptStore",
           "IncompleteStore", "StoreLimitExceeded", "StoreExists", "StoreMismatch", "StoreLocked", "StoreWriteError",
           "StorageUnavailable", "SpecError", "DataError", "FingerprintMismatch", "ModelMismatch", "NonFiniteOutputs", "ConfigError",
           "CheckpointError", "CheckpointNotFound", "RunNotFound", "Interrupted", "one_line"]


class SoftLabelsError(Exception):
    """Base class of every error softlabels raises deliberately."""


class StoreError(SoftLabelsError):
    """A problem with a soft-label store."""


class StoreNotFound(StoreError, FileNotFoundError):
    """The store path does not exist."""


class NotAStore(StoreError, ValueError):
    """The path exists but is not a softlabels store."""


class UnsupportedFormat(StoreError, ValueError):
    """The store's format version (or layout) is not one this version reads."""


class CorruptStore(StoreError, ValueError):
    """The store's arrays or attributes are damaged or inconsistent."""


class StoreLimitExceeded(StoreError, ValueError):
    """A store's claimed sizes would make a reader allocate more than the documented bound (it stops
    the command, unlike a :class:`CorruptStore`, which marks one chunk damaged)."""


class IncompleteStore(StoreError, RuntimeError):
    """The store is still being written (or its writer died) and is not complete."""


class StoreExists(StoreError, FileExistsError):
    """A store already exists where a new one was asked for."""


class StoreMismatch(StoreError, ValueError):
    """An existing store was made with different settings than the ones given."""


class StoreLocked(StoreError, BlockingIOError):
    """Another process is writing this store."""


class StoreWriteError(StoreError, OSError):
    """The operating system refused a write (disk full, read-only, permissions)."""


class StorageUnavailable(StoreError, OSError):
    """Object storage kept failing with transient errors (5xx, timeouts) past the retry budget."""


class SpecError(SoftLabelsError, ValueError):
    """A --teacher/--student/--data spec cannot be resolved."""


class DataError(SoftLabelsError, ValueError):
    """Input data is missing, malformed or does not fit the model."""


class FingerprintMismatch(SoftLabelsError, ValueError):
    """The inputs given do not match the inputs the store was generated from."""


class ModelMismatch(SoftLabelsError, ValueError):
    """A model does not fit its weights, its inputs, or the store's class count."""


class NonFiniteOutputs(SoftLabelsError, ArithmeticError):
    """The teacher produced NaN or infinite logits."""


class ConfigError(SoftLabelsError, ValueError):
    """Invalid option values; the message lists every problem found."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class CheckpointError(SoftLabelsError, ValueError):
    """A checkpoint file is unreadable or is not a softlabels training checkpoint."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


class RunNotFound(SoftLabelsError, FileNotFoundError):
    """The run directory does not exist or holds no training run."""


class Interrupted(SoftLabelsError):
    """The user stopped a job (Ctrl-C); every finished unit or epoch is kept."""


def one_line(err: BaseException, limit: int = 200, *, typed: bool = True) -> str:
    """``Type: text`` of a foreign exception (the text alone unless ``typed``; the type when it has none),
    on one line and cut at ``limit`` characters, to quote inside a message."""
    text = " ".join(str(err).split())[:limit]
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if typed else text
