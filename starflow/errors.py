"""The errors starflow raises on purpose: bad input, bad configs, bad checkpoints, full disks, limits.

Every class derives from ``StarflowError`` so the command line can tell an expected failure (one line,
exit status 2) from a bug (a traceback). Each also derives from the built-in exception callers already
catch for that kind of problem (``ValueError``, ``OSError``, ``RuntimeError``), so code written against
the built-ins keeps working. Messages name the input and the problem.
"""
from __future__ import annotations

import errno
import os


class StarflowError(Exception):
    """Base of every expected failure."""


class BadInputError(StarflowError, ValueError):
    """An argument, file or value that cannot be used (wrong type, range, shape or content)."""


class ConfigError(BadInputError):
    """A model or training config (config.json, a YAML recipe, ``--set``) that fails validation."""


class LimitError(BadInputError):
    """A request for more work or memory than a command accepts (sizes, steps, images, pixels)."""


class UnsafePathError(BadInputError):
    """A path read from a file (an index, a manifest, a noise file) that leaves its folder."""


class NonFiniteError(BadInputError):
    """NaN or infinity in weights being loaded, or in images, latents or tensors about to be written."""


class CheckpointError(StarflowError, ValueError):
    """A checkpoint or saved model that is missing, corrupt, or does not fit its config."""


class OutputError(StarflowError, OSError):
    """An output path that cannot be written: read-only, a file where a folder is expected, ..."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror if self.strerror else super().__str__()


class DiskFullError(OutputError):
    """No space left for a write; the previous file (if any) is left in place."""


class TrainingError(StarflowError, RuntimeError):
    """Training cannot continue: divergence that rollbacks do not cure, a locked output folder."""


def os_error_message(e: OSError, path: str | None = None) -> str:
    """A one-line description of an ``OSError`` naming the path and the problem in plain words."""
    where = path or e.filename
    if where is None:
        return str(e.strerror or e)
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {where}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: permission denied or read-only"
    if e.errno == errno.ENOTDIR:
        return f"cannot use {where}: a file is in the way where a folder is expected"
    if e.errno == errno.EISDIR:
        return f"cannot use {where}: it is a folder, expected a file"
    return f"{where}: {e.strerror or e}"


def as_output_error(e: OSError, path: str | None = None) -> OutputError:
    """Wrap an ``OSError`` raised while writing as ``DiskFullError``/``OutputError`` with a clear message."""
    cls = DiskFullError if e.errno == errno.ENOSPC else OutputError
    err = cls(e.errno, os_error_message(e, path))
    err.filename = path or e.filename
    return err


def check_output_dir(folder: str, what: str = "output folder") -> None:
    """Refuse early (before any work) a folder that cannot be created or written."""
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe):  # the nearest existing ancestor decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputError(errno.ENOTDIR, f"{what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"{what} {folder}: {probe} is not writable (read-only)")
