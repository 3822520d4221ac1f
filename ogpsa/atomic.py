"""Atomic file writes: every file ogpsa writes goes through here.

A write either replaces the target completely or leaves it (and its directory) as it was:
the new bytes go to a temporary file in the target's directory, are flushed and
``fsync``-ed, and the file is moved over the target with :func:`os.replace` (atomic on
POSIX and Windows within one file system); the directory is then ``fsync``-ed so the rename
survives a power loss.

What a failure leaves behind:

* an exception during the write (disk full, a serialiser error, ``KeyboardInterrupt``): the
  temporary file is removed, the old target is untouched;
* a killed writer (``SIGKILL``, out-of-memory killer): on Linux the temporary file is
  created with ``O_TMPFILE``, an unnamed inode that the kernel frees when the process dies,
  and gets a name only for the instant between ``linkat`` and ``rename``; elsewhere (or on a
  file system without ``O_TMPFILE``) it is a named ``.<target>.<host>.<pid>.<random>.ogpsa-tmp``
  file, and the next atomic write into that directory removes such files of this host whose
  writer process no longer exists (another host's are left alone: a shared file system).

Use :func:`write_bytes`, :func:`write_text` and :func:`write_json` for whole files, or
:func:`open_atomic` for a writer that streams into a file object.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

TMP_SUFFIX = ".ogpsa-tmp"
"""Suffix of the named temporary files (used only where ``O_TMPFILE`` is not available)."""

_O_TMPFILE_OK: dict[str, bool] = {}  # directory -> whether O_TMPFILE + linkat worked there


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell
        return True
    return True


def remove_stale_temporaries(directory: PathLike) -> list[str]:
    """Remove the named temporary files of writers in ``directory`` that were killed
    (their process id no longer exists). Returns the removed paths."""
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
            continue
        parts = name[: -len(TMP_SUFFIX)].rsplit(".", 3)  # base, host, pid, random
        # only this host's: a process id means nothing on another machine sharing the directory
        if len(parts) != 4 or parts[1] != _host() or not parts[2].isdigit():
            continue
        if not _pid_alive(int(parts[2])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _temp_name(base: str) -> str:
    """``.<target>.<host>.<pid>.<random>.ogpsa-tmp``: host and pid let a later write recognise
    the leftovers of a killed writer on this machine."""
    return f".{base}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _named_temp(directory: str, base: str) -> tuple[int, str]:
    tmp = os.path.join(directory, _temp_name(base))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return fd, tmp


def _unnamed_temp(directory: str) -> int | None:
    """An ``O_TMPFILE`` descriptor in ``directory``, or None where that is not supported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or _O_TMPFILE_OK.get(directory) is False or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        # mode 0o666 filtered by the umask, as for a named file (open(2))
        return os.open(directory, flag | os.O_RDWR, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            _O_TMPFILE_OK[directory] = False
            return None
        raise


def _publish(fd: int, named_tmp: str | None, directory: str, base: str, target: str) -> None:
    """Give the written temporary file the target's name, atomically."""
    if named_tmp is not None:
        os.replace(named_tmp, target)
        return
    # linkat(AT_SYMLINK_FOLLOW) names the unnamed inode; the name lives only until the rename.
    tmp = os.path.join(directory, _temp_name(base))
    try:
        os.link(f"/proc/self/fd/{fd}", tmp, follow_symlinks=True)
    except OSError:
        _O_TMPFILE_OK[directory] = False
        raise
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _O_TMPFILE_OK[directory] = True


def _copy_fd(src: int, dst: int) -> None:
    os.lseek(src, 0, os.SEEK_SET)
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


@contextlib.contextmanager
def open_atomic(path: PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` atomically when the block ends without
    an exception (``mode`` ``"wb"``, or ``"w"``: text in ``encoding``). On an exception the target is untouched and
    no temporary file remains. The directory must exist."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic mode={mode!r}: use 'wb' or 'w'")
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {target}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {target}: it is a directory")
    remove_stale_temporaries(directory)
    named_tmp = None
    fd = _unnamed_temp(directory)
    if fd is None:
        fd, named_tmp = _named_temp(directory, base)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None, closefd=False) as f:
            yield f
            f.flush()
            os.fsync(fd)
        try:
            _publish(fd, named_tmp, directory, base, target)
        except OSError:
            if named_tmp is not None:
                raise
            # linkat refused (e.g. no access to /proc): copy into a named temporary file instead
            fd2, named_tmp = _named_temp(directory, base)
            try:
                _copy_fd(fd, fd2)
                os.fsync(fd2)
            finally:
                os.close(fd2)
            os.replace(named_tmp, target)
        named_tmp = None
    except BaseException:
        if named_tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(named_tmp)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    _fsync_dir(directory)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docs)."""
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON (serialised fully before the file is touched)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig(path, ...)`` atomically (the format from the file extension, png by default)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)


__all__ = ["open_atomic", "write_bytes", "write_text", "write_json", "save_figure", "remove_stale_temporaries",
           "TMP_SUFFIX"]
