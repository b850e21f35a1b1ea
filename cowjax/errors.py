"""User-facing errors and atomic file and folder output.

A ``CowjaxError`` is a user's mistake or a broken input file: ``launch.py`` and the command-line
entry points print its message as one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


class CowjaxError(Exception):
    """An error whose message names the file or value and the problem, meant for the user."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the ``python -m`` entry points: a usage mistake is one line and exit 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a plain open() or mkdir() would give: temporary files start private (0600, 0700), and an
# output renamed into place keeps that mode, unreadable to the user's group.
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    So an interrupted or failed write never leaves a partial output file. The temporary name keeps
    the suffixes of ``path`` (``.nii.gz``, ``.mrk.json``) so writers that dispatch on them work;
    the file gets the mode a plain ``open`` would give (``FILE_MODE``, from the umask).
    """
    path = Path(path)
    if not path.parent.exists():
        raise CowjaxError(f"{path}: output directory {path.parent} does not exist")
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike):
    """Yield a temporary folder beside ``path`` (whose parent must exist); move it onto ``path``,
    replacing a folder already there, only if the block succeeds. Never a half-written folder."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.chmod(DIR_MODE)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
