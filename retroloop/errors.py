"""Named errors. Each carries one line a user can act on: the key, file or value and what to do.

The CLI prints `str(err)` on one line and exits non-zero; nothing else catches them.
"""


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
