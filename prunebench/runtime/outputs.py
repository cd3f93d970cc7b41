"""Where a command writes: claimed before any work is done, never silently replaced.

The rule (docs/evaluation.md, "Outputs"):

* A command claims its output when it starts, before it computes anything: a file by creating it
  exclusively (an empty placeholder, which the command's first atomic write replaces), a directory
  by creating it. Two runs given the same path cannot both write it: the second stops at once.
* An existing file is never replaced without ``--overwrite``; with it, only when the new run writes
  (atomically), so a run that fails first leaves it as it was. An existing directory must be empty
  unless ``--overwrite``; the files a command will write in it (``members``) are claimed as files.
* Default names (``results/<stem>_<time>``) take the next free ``-2``, ``-3``, ... suffix instead of
  colliding with a run started in the same second.
* A path that cannot be written (a directory where a file is expected, a read-only folder, a folder
  that is a file) is one line naming the path and the reason, exit 2.

Claims a command never wrote are removed when it ends (:func:`releasing`), so a run that fails before
its first write leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from prunebench.contract.errors import PrunebenchError

OVERWRITE_HELP = ("replace an existing --output, only once this run writes its own (without it, an "
                  "existing output is refused before any work)")

# what this process claimed: (path, (device, inode) of the empty placeholder, or None for a directory)
_CLAIMS: list[tuple[Path, tuple[int, int] | None]] = []


class _Exists(PrunebenchError):
    """The path exists and may not be replaced (a default name then tries the next suffix)."""


def stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%dT%H%M%S")


def claim(given: str | Path | None, default_stem: str, overwrite: bool, *, suffix: str = ".json",
          directory: bool = False, members: tuple[str, ...] | list[str] = ()) -> Path:
    """Claim ``given``, or a fresh ``results/<default_stem>_<time>[-n]<suffix>``, for this command."""
    if given:
        return _claim(Path(given), overwrite, directory, members)
    base = f"{default_stem}_{stamp()}"
    for n in itertools.count(1):
        path = Path("results") / (base + (f"-{n}" if n > 1 else "") + ("" if directory else suffix))
        try:
            return _claim(path, False, directory, members, fresh=True)
        except _Exists:
            continue  # another run took this name (same second): the next suffix


def _claim(path: Path, overwrite: bool, directory: bool, members, fresh: bool = False) -> Path:
    try:
        _make_parent(path)
        if directory:
            _claim_directory(path, overwrite, members, fresh)
        else:
            _claim_file(path, overwrite)
    except PrunebenchError:
        raise
    except OSError as err:
        raise PrunebenchError(f"cannot write {path}: {_reason(err, path)}") from None
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise PrunebenchError(f"cannot write {path}: {blocker} is a file, not a folder") from None


def _claim_file(path: Path, overwrite: bool) -> None:
    try:
        # 0o666 less the umask, like any file the user creates
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        if path.is_dir():
            raise PrunebenchError(f"cannot write {path}: it is a directory; give a file path") from None
        if not overwrite:
            empty = " (empty: claimed by a run that is still running, or was killed)" if _empty(path) else ""
            raise _Exists(f"{path} exists{empty}; choose another --output or pass --overwrite") from None
        _probe(path.parent)  # the new file will replace it by a rename in that folder
        return
    st = os.fstat(fd)
    os.close(fd)
    _CLAIMS.append((path, (st.st_dev, st.st_ino)))


def _claim_directory(path: Path, overwrite: bool, members, fresh: bool) -> None:
    """``fresh``: only a directory this call creates will do (a default name)."""
    try:
        path.mkdir()
        _CLAIMS.append((path, None))
    except FileExistsError:
        if not path.is_dir():
            raise PrunebenchError(f"cannot write {path}: it is a file; give a directory") from None
        if fresh or (not overwrite and any(path.iterdir())):
            raise _Exists(f"{path} exists and is not empty; choose another --output or pass "
                          f"--overwrite") from None
    for name in members:
        _claim_file(path / name, overwrite)
    if not members:
        _probe(path)


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _probe(folder: Path) -> None:
    """Raise the OS error that writing a file in ``folder`` would meet (read-only, no permission)."""
    fd, tmp = tempfile.mkstemp(prefix=".prunebench-probe-", dir=folder)
    os.close(fd)
    os.unlink(tmp)


def _reason(err: OSError, path: Path) -> str:
    where = f" ({err.filename})" if err.filename and Path(err.filename) != path else ""
    return f"{err.strerror or err}{where}"


@contextmanager
def releasing():
    """Around a command: on the way out, remove what it claimed and never wrote (an empty
    placeholder that is still ours, an empty directory it created)."""
    mark = len(_CLAIMS)
    try:
        yield
    finally:
        while len(_CLAIMS) > mark:
            path, identity = _CLAIMS.pop()
            try:
                if identity is None:
                    path.rmdir()  # only if empty
                else:
                    st = path.stat()
                    if st.st_size == 0 and (st.st_dev, st.st_ino) == identity:
                        path.unlink()
            except OSError:
                pass  # written, replaced or gone: nothing of ours to remove
