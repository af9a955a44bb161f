"""A reader-writer lock: many readers at once, or one writer; a waiting writer holds back new readers.

The memory bank takes it in every public call: searches, fetches and reads share it, while adds, deletes,
evictions and loads hold it alone, and only to publish (slow work happens before). Reads nest per thread, so that
:meth:`MemoryBank.reading` can hold one state across several reads (a search and the fetch of its hits); a thread
that holds a read cannot write (RuntimeError: it would wait for itself). Each thread's reads are counted by thread
id under the lock's own mutex, so blocks that end out of order (generators, asyncio tasks sharing the loop's
thread) or in another thread than they began (a generator closed elsewhere) leave the count right.

:func:`dir_lock` is the same between processes sharing a bank directory: an advisory lock on ``DIR/.lock`` that
saves and commits take alone and loads share (:mod:`memlong.storage`).

:func:`interrupts_held` keeps Ctrl-C (and SIGTERM / SIGALRM handlers) out of the lock's bookkeeping and of a
write's body: the signal's handler runs when the block ends. A ``KeyboardInterrupt`` raised between two lines of a
change left the bank half-changed (counted but not indexed) or the lock held for ever (the next call hung). Waits
for the lock stay interruptible."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RWLock", "dir_lock", "interrupts_held"]

try:
    import _signal as _sig  # signal's own functions without its enum conversions: 10x faster, on every bank call
except ImportError:  # (not CPython)
    _sig = signal  # type: ignore[assignment]

HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGALRM") if hasattr(signal, name))


class _Held:
    """The main thread's held signals (only it runs Python signal handlers). Each field is set in one statement,
    so that a signal between two lines leaves them consistent."""
    depth = 0  # open interrupts_held blocks (stale if a signal cut the last one's restore: see _nested)
    waiting = False  # inside an interruptible wait: a signal's handler runs at once
    saved: dict[int, Any] = {}  # signal -> the handler _hold stands in for
    swapped: tuple[int, ...] = ()  # the signals the open blocks hold
    pending: list[tuple[int, Any]] = []


def _hold(signum: int, frame: Any) -> None:
    if _Held.depth and not _Held.waiting:
        _Held.pending.append((signum, frame))
    elif callable(handler := _Held.saved.get(signum)):
        handler(signum, frame)


def _swap() -> None:
    swapped = []
    for sig in HELD_SIGNALS:
        handler = _sig.getsignal(sig)
        if handler is _hold:  # still in place after a restore a signal cut short: its saved handler stands
            swapped.append(sig)
        elif callable(handler):  # not SIG_DFL / SIG_IGN / a handler set outside Python
            _Held.saved[sig] = handler  # before the swap: with depth 0, _hold passes signals on to it
            try:
                _sig.signal(sig, _hold)
            except ValueError:  # not the main interpreter: nothing to hold
                break
            swapped.append(sig)
    _Held.swapped = tuple(swapped)


def _nested() -> bool:
    """Inside an open block: depth counts one whose handlers are all still swapped."""
    return bool(_Held.depth) and all(_sig.getsignal(sig) is _hold for sig in _Held.swapped)


def _unswap() -> None:
    for sig, handler in list(_Held.saved.items()):
        if _sig.getsignal(sig) is _hold:
            _sig.signal(sig, handler)


_OFF, _NESTED, _OUTER = 0, 1, 2


class _HeldBlock:
    """One ``with interrupts_held():`` block (a class, not a generator: it runs on every call into a bank)."""

    __slots__ = ("kind",)

    def __enter__(self) -> None:
        self.kind = _OFF
        if threading.current_thread() is not threading.main_thread():
            return
        if _nested():  # already held
            _Held.depth += 1
            self.kind = _NESTED
            return
        try:
            _swap()  # (a signal until the next line is passed on: nothing is held yet)
            _Held.pending, _Held.waiting, _Held.depth = [], False, 1
        except BaseException:
            _unswap()
            raise
        self.kind = _OUTER

    def __exit__(self, *exc: object) -> None:
        if self.kind == _NESTED:
            _Held.depth -= 1
        elif self.kind == _OUTER:
            pending, main = _Held.pending, threading.current_thread() is threading.main_thread()
            try:
                if main:  # (not: a generator closed in another thread; the next block swaps again)
                    _unswap()  # (a signal meanwhile: held while its handler is _hold, raised at once after)
            finally:
                _Held.depth = 0
            for signum, frame in pending if main else ():
                _Held.saved[signum](signum, frame)


def interrupts_held() -> contextlib.AbstractContextManager[None]:
    """Run the block with SIGINT, SIGTERM and SIGALRM handlers held (those set from Python: Ctrl-C's
    ``KeyboardInterrupt``, a handler raising ``SystemExit``); a signal that came meanwhile is handled when the
    block ends. Blocks nest; threads other than the main one (which never run signal handlers) are not affected.

    Example:
        >>> with interrupts_held():
        ...     publish()   # a Ctrl-C now raises after publish() returns, not half-way through it
    """
    return _HeldBlock()


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Inside :func:`interrupts_held`: a wait that a signal may end (one held before it ends it at once)."""
    if threading.current_thread() is not threading.main_thread() or not _Held.depth:
        yield
        return
    _Held.waiting = True  # (a signal that ends the wait before the try leaves it set: the outer block resets it)
    try:
        if _Held.pending:
            signum, frame = _Held.pending.pop(0)
            _Held.saved[signum](signum, frame)
        yield
    finally:
        _Held.waiting = False


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
        this thread already reads (a nested read never waits: the waiting writer waits for this thread). The
        body runs with interrupts held, as a write's does."""
        me = threading.get_ident()
        with interrupts_held():
            with self._cond:
                if not self._depth.get(me):
                    while self._writer or self._writers_waiting:
                        with _interruptible():
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
        """Hold the lock alone (``with lock.write(): ...``); waits until the readers inside have left. The body
        runs with interrupts held (:func:`interrupts_held`): a change is made whole, then Ctrl-C raises.

        Raises:
            RuntimeError: this thread holds a read (within ``MemoryBank.reading()``); it would wait for itself.
        """
        if self._depth.get(threading.get_ident()):
            raise RuntimeError("A memory bank cannot be changed inside its own `with bank.reading():` block (the "
                               "change would wait for the block to end); change it after the block.")
        with interrupts_held():
            with self._cond:
                self._writers_waiting += 1
                try:
                    while self._writer or self._readers:
                        with _interruptible():
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
