"""The failures a user can fix, each reported by `akd` as one line without a traceback.

A message names what is wrong (file, setting, sample, shard) and what to do about it. `akd`
prints it as `akd <command>: <message>` and exits with code 2; `--debug` or `AKD_DEBUG=1` shows
the traceback. Anything that is not an `AkdError` is a bug and keeps its traceback.

Each class also derives from the built-in exception its raisers used before, so callers that
catch `ValueError`, `RuntimeError` or `FileNotFoundError` keep working.
"""

from __future__ import annotations


class AkdError(Exception):
    """An expected failure with a one-line, user-facing message."""


class ConfigError(AkdError, ValueError):
    """A setting (params.yaml key or command-line option) that cannot work."""


class DataError(AkdError, ValueError):
    """Input data that cannot be read or leaves nothing to use."""


class MissingInputError(AkdError, FileNotFoundError):
    """An earlier stage's output that is not there yet: run that stage first."""


class ModelError(AkdError, ValueError):
    """A model whose files, tokenizer or architecture the pipeline cannot use."""


class ModelNotFoundError(AkdError, FileNotFoundError):
    """A model reference that is neither a local folder nor a model on the hub."""


class CacheError(AkdError, ValueError):
    """A teacher cache or generations store that is missing, incomplete or not the one asked
    for."""


class DamageError(CacheError):
    """Stored bytes that fail their checks; the message names the array, the shard file and the
    sample range."""


class LockError(AkdError, RuntimeError):
    """Another writer holds the cache."""
