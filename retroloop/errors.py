"""Named errors. Each carries one line a user can act on: the key, file or value and what to do.

The CLI prints `str(err)` on one line and exits 2 (see `retroloop --help` for every exit code).
"""

import errno
import os

# Write failures that mean "the disk (or the file-size limit) is full", not a bug.
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class RetroloopError(Exception):
    """Base class: a failure the user can fix. Never raised for internal bugs."""


class ConfigError(RetroloopError):
    """`params.yaml` (or a profile) has a bad key or value."""


class DataError(RetroloopError):
    """An input dataset is missing, empty, undecodable or in the wrong format."""


class ArtifactError(RetroloopError):
    """An artifact or its manifest is missing, corrupted, or does not match what consumes it."""


class ModelError(RetroloopError):
    """A model source cannot be loaded or is not a supported architecture."""


class MismatchError(ArtifactError):
    """Teacher and student disagree on tokenizer, vocabulary or chat template."""


class MissingExtraError(RetroloopError):
    """An optional dependency (an extra) is needed for the chosen setting."""


class GuardError(RetroloopError):
    """A run-time self-check failed: the installed libraries compute something other than what
    the method needs (e.g. generation that silently drops the KV cache)."""


class DivergedError(RetroloopError):
    """A training run produced a non-finite loss, gradient or weight; nothing was published."""


class BusyError(RetroloopError):
    """Another run in this repository holds what this one needs (a stage's lock, DVC's lock)."""


class RemoteError(RetroloopError):
    """A worker without a shared disk cannot fetch its inputs or push what it trained (no DVC
    remote configured, a git remote that refuses, an experiment name already taken)."""


class WriteError(ArtifactError):
    """An output could not be written (disk full, file-size limit); nothing was published."""


def disk_full_reason(err: BaseException) -> str | None:
    """The OS reason if `err` is a disk-full / file-too-large write failure, else None.

    safetensors (Rust) and torch wrap the OS error in their own exception types and keep only
    its text ("File too large"), so the text is matched as well as `errno`."""
    if isinstance(err, OSError) and err.errno in _FULL_DISK:
        return os.strerror(err.errno)
    text = str(err)
    return next((os.strerror(code) for code in _FULL_DISK if os.strerror(code) in text), None)
