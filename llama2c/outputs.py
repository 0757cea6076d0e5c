"""Writing output files without destroying data.

- ``refuse_existing(path, force)``: the ``cp -n`` rule of the tools: an existing
  output is replaced only when the user said ``--force``.
- ``atomic_write(path, overwrite=...)``: a temporary file beside ``path``, fsynced,
  then renamed over it (``overwrite=True``) or linked to it only if it is still
  absent (``overwrite=False``, so a file that appeared meanwhile is not clobbered).
- ``atomic_path(path, overwrite=...)``: the same for a writer that opens the file
  itself (it gets the temporary file's name).
- ``commit(tmp, path, overwrite)``: that last step for a file written elsewhere.

Never imports torch or numpy.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    """An output file is already there and --force was not given."""


def refuse_existing(path, force: bool, flag: str = "--force") -> None:
    """Raises OutputExistsError (one line, naming ``flag``) when ``path`` exists
    and ``force`` is false."""
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it without {flag}")


def commit(tmp, path, overwrite: bool) -> None:
    """Moves the finished temporary file ``tmp`` to ``path`` (same directory).
    Without ``overwrite`` an existing ``path`` is left alone: hard-linking fails
    when the name is taken, so the check and the rename are one step."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        refuse_existing(path, force=False)
    except OSError as e:            # no hard links on this filesystem
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK,
                           errno.ENOSYS):
            raise
        refuse_existing(path, force=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """An open temporary file in path's directory (created if missing), with the
    mode a plain open() would give it (mkstemp makes it 0600)."""
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = True):
    """Yields the name (a Path) of a temporary file beside ``path`` for a writer
    that opens and closes the file itself; on success the file is fsynced and
    moved to ``path`` (see commit), on error removed."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        commit(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, overwrite: bool = True):
    """Yields a binary file object for a temporary file beside ``path`` and
    moves it to ``path`` on success (see atomic_path); removes it on error."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            yield f
