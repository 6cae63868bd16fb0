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

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sae_lens.constants import SAE_CFG_FILENAME

from sae_e2e_plugin.run_files import CHECKPOINTS_DIRNAME, RUN_OUTPUT_FILES

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".sae-e2e.lock"
"""Held (``flock``) by the process that is training into the folder; says which process it is."""


class FolderInUseError(RuntimeError):
    """Another running process holds the folder (``hold_folder``)."""


def previous_run_files(output: Path) -> list[Path]:
    """The files and folders of an earlier run in ``output``."""
    found = [output / name for name in RUN_OUTPUT_FILES if (output / name).exists()]
    if (output / CHECKPOINTS_DIRNAME).is_dir() and any((output / CHECKPOINTS_DIRNAME).iterdir()):
        found.append(output / CHECKPOINTS_DIRNAME)
    return found


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
    return previous


def remove_previous_run(previous: list[Path]) -> None:
    """Delete the previous run's files that ``check_output_folder`` returned."""
    if previous:
        names = ", ".join(path.name for path in previous)
        logger.warning(f"overwrite_output=True: removing the previous run's {names}")
    for path in previous:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def export_atomically(output_path: str, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` into a staging sibling of ``output_path``, then move its files in.

    Each file lands with ``os.replace`` (whole or not at all), ``cfg.json`` last, so a run killed
    during the export leaves no loadable half-written SAE.
    """
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".export-"))
    try:
        write(str(staging))
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == SAE_CFG_FILENAME):
            os.replace(staging / name, output / name)
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
    with open(path, "a+") as handle:
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
        handle.truncate(0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        handle.write(json.dumps(holder))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(text: str) -> str:
    """The lock file's holder, in words (``unknown`` for an empty or foreign file)."""
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
