"""A run's ``output_path``: never mixed with, or silently replacing, another run's files.

When a run is built, ``check_output_folder`` looks for a previous run's files in
``output_path`` (``run_files.RUN_OUTPUT_FILES`` and the default checkpoint folder). A
previous run is refused unless this run resumes it or ``overwrite_output=True`` asks for it
to be replaced, in which case exactly those files are removed when the run starts, so nothing of the old
run is left next to the new one. Files the package did not write are never touched.

While a run trains, ``hold_folder`` keeps its folders to itself: a second process (another run,
a second sweep started on the same ``output_dir``) pointed at them is refused instead of writing
into the same training log and checkpoints.

``export_atomically`` writes the exported SAE into a staging sibling and moves each file into
place, ``cfg.json`` last: a folder that SAELens can load holds a complete export.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sae_lens.constants import SAE_CFG_FILENAME

from sae_e2e_plugin.run_files import (
    CHECKPOINTS_DIRNAME,
    RUN_OUTPUT_FILES,
    disk_full,
    is_disk_full,
)

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".sae-e2e.lock"
"""Held (``flock``) by the process that is training into the folder; says which process it is."""


class FolderInUseError(RuntimeError):
    """Another running process holds the folder (``hold_folder``)."""


def previous_run_files(output: Path) -> list[Path]:
    """The files and folders of an earlier run in ``output``."""
    found = [output / name for name in RUN_OUTPUT_FILES if _present(output / name)]
    checkpoints = output / CHECKPOINTS_DIRNAME
    if checkpoints.is_symlink() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        found.append(checkpoints)
    return found


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is there too


def check_output_folder(output_path: str | None, *, resuming: bool, overwrite: bool) -> list[Path]:
    """Refuse an ``output_path`` that holds another run; return that run's files when
    ``overwrite`` asks for them to be replaced (``remove_previous_run`` deletes them once the
    new run starts, so a run refused later by another check deletes nothing)."""
    if output_path is None:
        return []
    output = Path(output_path)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_path={output_path!r} is a file; give a folder for the SAE.")
    previous = previous_run_files(output) if output.is_dir() else []
    if not previous or resuming:
        return []
    if not overwrite:
        names = ", ".join(path.name for path in previous)
        raise ValueError(
            f"output_path={output_path!r} holds a previous run ({names}). Choose a new "
            "output_path, resume that run with resume_from_checkpoint=<its checkpoint>, or set "
            "overwrite_output=True to delete those files and start again."
        )
    # Checked for every file before any is removed: a refusal leaves the folder as it was.
    for path in previous:
        if path.name != CHECKPOINTS_DIRNAME and path.is_dir() and not path.is_symlink():
            raise ValueError(
                f"output_path={output_path!r}: {path.name} is a folder, which no run writes, "
                "so overwrite_output=True does not delete it. Move it away or choose a new "
                "output_path."
            )
    return previous


def remove_previous_run(previous: list[Path]) -> None:
    """Delete the previous run's files that ``check_output_folder`` returned."""
    if previous:
        names = ", ".join(path.name for path in previous)
        logger.warning(f"overwrite_output=True: removing the previous run's {names}")
    for path in previous:
        # A link is removed itself, never the folder or file it points to.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def export_atomically(output_path: str, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` into a staging sibling of ``output_path``, then move its files in.

    Each file lands with ``os.replace`` (whole or not at all), ``cfg.json`` last, so a run killed
    during the export leaves no loadable half-written SAE.
    """
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".export-*"):  # a killed export's (the folder is held: not live)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".export-"))
    try:
        write(str(staging))
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == SAE_CFG_FILENAME):
            os.replace(staging / name, output / name)
    except Exception as error:
        if is_disk_full(error):  # SAELens' or safetensors' own error, named as what it is
            raise disk_full(output / SAE_CFG_FILENAME) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def hold_folder(
    folder: str | Path, field: str, *, lock_name: str = LOCK_FILENAME
) -> Iterator[None]:
    """Hold ``folder`` for this process until the block ends; another process (or another
    ``hold_folder`` of this one) that tries meanwhile gets ``FolderInUseError``.

    An advisory ``flock`` on ``lock_name`` inside the folder: the kernel drops it when the
    holder exits, however it exits, so a killed run never leaves a stale lock behind. The file
    itself stays (deleting it would let two processes lock two different files). Platforms
    without ``fcntl`` (Windows) run without the lock. A different ``lock_name`` is a different
    hold (a sweep claims a run's folder with one while the run holds it with the default).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(folder) / lock_name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_lock_file(path, field, folder) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FolderInUseError(
                f"{field}={str(folder)!r} is in use by another running process "
                f"({_holder(handle.read())}). Wait for it to finish, stop it, or choose another "
                f"{field}."
            ) from None
        except OSError as error:  # e.g. a network file system without locks: warn, go on
            logger.warning(f"could not lock {field}={str(folder)!r} ({error}); not guarded")
            yield
            return
        handle.seek(0)
        handle.truncate(0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        handle.write(json.dumps(holder))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_lock_file(path: Path, field: str, folder: str | Path) -> Any:
    """``path`` opened for reading and writing, never through a link: a lock file that is a
    symlink (or anything but a plain file) is refused by name, so taking the lock never
    truncates or writes a file outside the folder."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    refusal = (
        f"{field}={str(folder)!r}: its lock file {path} is a link or not a plain file, so it "
        "is not opened (writing it could change a file elsewhere). Remove it and start again."
    )
    if path.is_symlink():
        raise ValueError(refusal)
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as error:  # ELOOP: a link put there between the check and the open
        if error.errno in (errno.ELOOP, errno.EISDIR):
            raise ValueError(refusal) from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ValueError(refusal)
    return os.fdopen(descriptor, "r+")


def _holder(text: str) -> str:
    """The lock file's holder, in words (``unknown`` for an empty or foreign file)."""
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
