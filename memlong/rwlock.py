"""A reader-writer lock: many readers at once, or one writer; a waiting writer holds back new readers.

The memory bank takes it in every public call: searches, fetches and reads share it, while adds, deletes,
evictions and loads hold it alone, and only to publish (slow work happens before). Reads nest per thread, so that
:meth:`MemoryBank.reading` can hold one state across several reads (a search and the fetch of its hits); a thread
that holds a read cannot write (RuntimeError: it would wait for itself). Each thread's reads are counted by thread
id under the lock's own mutex, so blocks that end out of order (generators, asyncio tasks sharing the loop's
thread) or in another thread than they began (a generator closed elsewhere) leave the count right.

:func:`dir_lock` is the same between processes sharing a bank directory: an advisory lock on ``DIR/.lock`` that
saves and commits take alone and loads share (:mod:`memlong.storage`)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RWLock", "dir_lock"]


class RWLock:
    """Many readers at once, or one writer. A waiting writer holds back new readers, so a stream of searches
    cannot starve an ingest. Reads nest within a thread; writes do not."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._depth: dict[int, int] = {}  # thread id -> its open read blocks (the lock is held once per thread)

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared (``with lock.read(): ...``); waits while a writer holds or waits for it, unless
        this thread already reads (a nested read never waits: the waiting writer waits for this thread)."""
        me = threading.get_ident()
        with self._cond:
            if not self._depth.get(me):
                while self._writer or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
            self._depth[me] = self._depth.get(me, 0) + 1
        try:
            yield
        finally:  # ``me``, not the thread that ends the block: a generator may be closed in another thread
            with self._cond:
                self._depth[me] -= 1
                if not self._depth[me]:
                    del self._depth[me]
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock alone (``with lock.write(): ...``); waits until the readers inside have left.

        Raises:
            RuntimeError: this thread holds a read (within ``MemoryBank.reading()``); it would wait for itself.
        """
        if self._depth.get(threading.get_ident()):
            raise RuntimeError("A memory bank cannot be changed inside its own `with bank.reading():` block (the "
                               "change would wait for the block to end); change it after the block.")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting (Ctrl-C): the readers held back for it may go on
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@contextlib.contextmanager
def dir_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Advisory flock on ``DIR/.lock`` (POSIX only; a read-only bank without a lock file is read unlocked).

    The lock file is opened without following a symlink and without blocking, and must be a regular file: a
    symlink there could make a save create a file elsewhere, a FIFO could make a load wait forever (MemoryFileError).
    """
    from memlong.storage import MemoryFileError  # (storage takes this lock)

    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer per directory is then the caller's job
        yield
        return
    lock = path / ".lock"
    flags = (os.O_RDWR | os.O_CREAT) if exclusive else os.O_RDONLY
    try:
        fd = os.open(lock, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
    except FileNotFoundError:
        if exclusive:
            raise
        yield
        return
    except OSError:
        if os.path.islink(lock) or (os.path.lexists(lock) and not os.path.isfile(lock)):
            raise MemoryFileError(f"{lock} is a symbolic link or not a regular file; a memory bank's lock file must "
                                  "be a regular file. Remove it.") from None
        if exclusive:
            raise
        yield  # e.g. a read-only directory without permission to open it: read unlocked
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemoryFileError(f"{lock} is not a regular file (a FIFO, device or directory?); a memory bank's "
                                  "lock file must be a regular file. Remove it.")
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
