"""Writing a file atomically and durably, with its temp file never left behind by a save that ran to its end.

:func:`atomic_write` writes into a new temp file next to the target, ``.<name>.<12 hex digits>.tmp`` (a name too
long for that: a prefix of it and its hash), flushes
it to disk, renames it onto the target and flushes the directory.  Whatever goes wrong (an error, a signal's
exception such as KeyboardInterrupt) removes the temp file before the exception goes on, and an OSError is
raised again naming the target.

A save killed outright (SIGKILL, a power cut) cannot remove its temp file; the next save of the same target
does.  A save holds an exclusive ``flock`` on its temp file from its creation to the rename, and the kernel
drops it when the process dies however it dies, so a temp file of the target's pattern whose lock can be
taken is one no save is writing: it is removed.  One another save (another thread or process, another host
over NFS) is writing stays.  Only names of the target's own pattern are looked at; where ``flock`` does not
exist (Windows) or the file system refuses it, nothing is removed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import threading

try:
    import fcntl
except ImportError:  # Windows: no flock, so stale temp files are left
    fcntl = None

__all__ = ["atomic_write", "stale_temp_files", "remove_stale_temp_files"]

_LIVE = set()  # temp files this process is writing (POSIX locks of one process do not exclude each other on NFS)
_LIVE_LOCK = threading.Lock()


def _call(f, *args):
    return f(*args)


def atomic_write(path, write, *, run=_call):
    """Write the file ``path`` as ``write(f)`` writes into ``f`` (a binary file), atomically and durably.

    ``run(write, f)`` makes the call (an optimizer's step guard, so that the state written is that of
    one moment).  A symlink is written through (its target is replaced, the link stays); an existing
    file keeps its permission bits, a new one gets 0o666 less the umask.
    """
    # as str (a bytes path too: the temp files are found by a str pattern), through symlinks: the link stays,
    target = os.path.realpath(os.fsdecode(path))  # its target is replaced
    directory, base = os.path.split(target)
    try:
        try:
            info = os.stat(target)
        except FileNotFoundError:
            mode = None
        else:
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
            mode = stat.S_IMODE(info.st_mode)
        remove_stale_temp_files(target)
        fd, tmp = _new_temp(directory, base)
    except OSError as exc:
        raise _named(exc, target) from exc
    lock = fd
    try:
        lock = os.dup(fd)  # holds the flock (it belongs to the open file) until the rename is done
        with os.fdopen(fd, "wb") as f:
            run(write, f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(tmp, lock)
        if isinstance(exc, OSError):
            raise _named(exc, target) from exc
        raise
    _release(tmp, lock)
    _fsync_directory(directory)


def _named(exc, target):
    """``exc`` again, naming the file that was being saved (with the same errno: ENOSPC stays ENOSPC)."""
    if exc.errno is None:
        return OSError(f"{exc}: cannot save to {target!r}; nothing there was changed")
    return OSError(exc.errno, f"{exc.strerror or exc}: cannot save to {target!r}; nothing there was changed")


_NAME_MAX = 255  # bytes in a file name (Linux, macOS, Windows): a temp file's name must fit as its target's does
_TEMP_EXTRA = len(".") + len(".") + 12 + len(".tmp")  # what a temp file's name adds to its stem


def _stem(base):
    """The part of a temp file's name taken from its target's name ``base``: ``base`` itself, or where the temp
    name would not fit in a file name, a prefix of it and 16 hex digits of its hash (the same for each save of
    one target, so that stale temp files are found)."""
    if len(os.fsencode(base)) + _TEMP_EXTRA <= _NAME_MAX:
        return base
    digest = hashlib.sha1(os.fsencode(base)).hexdigest()[:16]
    prefix = base
    while len(os.fsencode(prefix)) + 1 + len(digest) + _TEMP_EXTRA > _NAME_MAX:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def _temp_pattern(base):
    return re.compile(re.escape(f".{_stem(base)}.") + r"[0-9a-f]{12}\.tmp\Z")


def _new_temp(directory, base):
    """A new file next to the target, created with mode 0o666 so the umask applies as for any new file,
    exclusively locked (where flock exists): (its fd, its path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".{_stem(base)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        with _LIVE_LOCK:
            _LIVE.add(tmp)
        try:
            if _lock(fd, wait=True) and not _same_file(fd, tmp):  # removed as stale before it was locked
                _discard(None, fd)
                with _LIVE_LOCK:
                    _LIVE.discard(tmp)
                continue
        except BaseException:
            _discard(tmp, fd)
            raise
        return fd, tmp


def _lock(fd, wait) -> bool:
    """Take the exclusive flock of ``fd``'s file: True if taken, False if another holds it or there is none."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: a live save holds it; ENOLCK, EOPNOTSUPP: this file system has none
        return False
    return True


def _same_file(fd, path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    here = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (here.st_dev, here.st_ino)


def _discard(tmp, fd):
    """Remove the temp file ``tmp`` (if given), then close ``fd``: in that order, so no other save takes a
    live temp file for a stale one between the two."""
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _release(tmp, fd)


def _release(tmp, fd):
    try:
        os.close(fd)
    except OSError:
        pass
    if tmp is not None:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)


def stale_temp_files(target) -> list:
    """The temp files of ``target``'s pattern in its directory that no save is writing now (sorted)."""
    return sorted(path for path, fd in _stale(target, remove=False))


def remove_stale_temp_files(target) -> list:
    """Remove the temp files that saves of ``target`` killed before their end left; return their paths."""
    return sorted(path for path, _ in _stale(target, remove=True))


def _stale(target, remove):
    if fcntl is None:
        return
    directory, base = os.path.split(os.path.realpath(os.fsdecode(target)))
    pattern = _temp_pattern(base)
    try:
        names = [entry.name for entry in os.scandir(directory or ".") if pattern.match(entry.name)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        with _LIVE_LOCK:
            if path in _LIVE:
                continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # gone already, or a symlink: not a temp file of a save
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not _lock(fd, wait=False) or not _same_file(fd, path):
                continue
            if remove:
                try:
                    os.unlink(path)  # while holding its lock: a new save cannot have taken this name meanwhile
                except OSError:
                    continue
            yield path, fd
        finally:
            os.close(fd)


def _fsync_directory(directory):
    """Make the rename durable where the platform allows it (POSIX); best effort elsewhere."""
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
