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
import io
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
    made = []  # (temp file object, its path), put there by _new_temp before it returns
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
        _new_temp(directory, base, made)
        f, tmp = made
        out = io.BufferedWriter(f)  # the temp file stays open, and locked, until it is renamed
        run(write, out)
        out.flush()
        os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if fcntl is None:
            f.close()  # Windows: an open file cannot be renamed over another (and there is no lock to hold)
        os.replace(tmp, target)
    except BaseException as exc:
        if made:  # (a signal's exception may come as _new_temp returns: what it made is here all the same)
            _discard(made[1], made[0])
        if isinstance(exc, OSError):
            raise _named(exc, target) from exc
        raise
    _release(made[1], made[0])
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


def _new_temp(directory, base, made=None):
    """A new file next to the target, created with mode 0o666 so the umask applies as for any new file,
    exclusively locked (where flock exists): (its unbuffered binary file object, its path), also put in the list
    ``made`` (where given) before it returns, for a caller to remove whatever comes after.

    Opened as a file object (``open``'s own O_CREAT | O_EXCL | O_CLOEXEC, in C), not as a bare fd: a signal's
    exception (KeyboardInterrupt) can come as the call returns, before the result is kept, and a lost file
    object closes its fd.  Its path is kept in ``_LIVE`` only inside the ``try`` that takes it out again."""
    while True:
        tmp = os.path.join(directory, f".{_stem(base)}.{secrets.token_hex(6)}.tmp")
        try:
            f = open(tmp, "xb", buffering=0)  # noqa: SIM115 (closed by the caller, or below)
        except FileExistsError:
            continue
        try:
            with _LIVE_LOCK:
                _LIVE.add(tmp)
            if _lock(f.fileno(), wait=True) and not _same_file(f.fileno(), tmp):
                # removed as stale before it was locked: its name is no longer its, make another
                _release(tmp, f)
                continue
            if made is not None:
                made[:] = f, tmp
        except BaseException:
            _discard(tmp, f)
            raise
        return f, tmp


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


def _discard(tmp, f):
    """Remove the temp file ``tmp``, then close its file object ``f``: in that order, so no other save takes a
    live temp file for a stale one between the two."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    _release(tmp, f)


def _release(tmp, f):
    try:
        f.close()
    except OSError:
        pass
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
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a symlink (or a FIFO...): not a temp file of a save
                continue
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (a file object: see _new_temp)
        except OSError:  # gone already
            continue
        with f:
            fd = f.fileno()
            if not _same_file(fd, path) or not _lock(fd, wait=False):  # (not a link put there meanwhile)
                continue
            if remove:
                try:
                    os.unlink(path)  # while holding its lock: a new save cannot have taken this name meanwhile
                except OSError:
                    continue
            yield path, fd


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
