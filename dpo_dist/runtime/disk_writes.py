"""Writes that name their file when the disk fails them, and leave nothing half-written behind.

A full disk surfaces as `[Errno 28] No space left on device` with no path (Python's write/fsync errors carry none),
and `datasets`' map, interrupted while writing a cache, leaves its truncated temporary file (`tmpXXXXXXXX`, an Arrow
stream) next to the cache: its clean-up finalizes the writer first, which fails again on the full disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def named(e: OSError, path: str | Path, doing: str = "") -> OSError:
    """The same OS error, with the file it was about (and what was being done) in its text."""
    if e.filename:
        return e
    text = f"{e.strerror or e}{f' while {doing}' if doing else ''}"
    return OSError(e.errno, text, str(path))


@contextlib.contextmanager
def no_leftovers(directory: str | Path, path: str | Path, doing: str) -> Iterator[None]:
    """Run a block that writes `path` in `directory` (through a temporary file and a rename, as `datasets` does): if
    it fails, remove the temporary files (`tmp*`) that appeared in the directory meanwhile and raise the error naming
    `path`."""
    folder = Path(directory)
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        yield
    except OSError as e:
        for name in set(os.listdir(folder)) - before if folder.is_dir() else ():
            if name.startswith("tmp") and name != Path(path).name:  # datasets' NamedTemporaryFile names, no other
                with contextlib.suppress(OSError):
                    (folder / name).unlink()
        raise named(e, path, doing) from e


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> None:
    """`path` holds the new text in full or is left as it was: written to a temporary name, then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise named(e, path) from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
