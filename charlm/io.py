"""Atomic file writes: every output goes to a temp file beside its target, then `os.replace`.

A stage killed half-way therefore never leaves a truncated file that DVC would then trust. A write
the operating system refuses (a full disk, a read-only directory) becomes one `OutputError` line
naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from charlm.errors import CharlmError

_HINTS = {
    errno.ENOSPC: "the disk is full; free some space and re-run",
    errno.EDQUOT: "the disk quota is used up; free some space and re-run",
    errno.EROFS: "the file system is read-only; write the outputs somewhere writable",
    errno.EACCES: "no permission to write there; fix the directory's permissions",
    errno.EPERM: "no permission to write there; fix the directory's permissions",
}


class OutputError(CharlmError):
    """An output that could not be written; nothing half-written is left behind."""


def _output_error(target: Path, e: OSError) -> OutputError:
    hint = _HINTS.get(e.errno, "check the path and re-run")
    return OutputError(f"cannot write {target}: {e.strerror or e}; {hint}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _output_error(target, e) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; the output should get the permissions a plain open() would give it.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _output_error(target, e) from None
    except BaseException:
        # BaseException: KeyboardInterrupt (SIGINT) and SystemExit (our SIGTERM handler) must clean up too.
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces `path` when the block exits cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Let `writer` fill a temp path (e.g. `torch.save`), then move it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Remove `path` if the block fails: an output rewritten as a run goes (the loss curve) is not an
    output of a run that did not finish."""
    try:
        yield
    except BaseException:
        if enabled:
            Path(path).unlink(missing_ok=True)
        raise
