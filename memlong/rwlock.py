"""A reader-writer lock: many readers at once, or one writer; a waiting writer holds back new readers.

The memory bank takes it in every public call: searches, fetches and reads share it, while adds, deletes,
evictions and loads hold it alone, and only to publish (slow work happens before). Reads nest per thread, so that
:meth:`MemoryBank.reading` can hold one state across several reads (a search and the fetch of its hits); a thread
that holds a read cannot write (RuntimeError: it would wait for itself). Each thread's reads are counted by thread
id under the lock's own mutex, so blocks that end out of order (generators, asyncio tasks sharing the loop's
thread) or in another thread than they began (a generator closed elsewhere) leave the count right.

:func:`dir_lock` is the same between processes sharing a bank directory: an advisory lock on ``DIR/.lock`` that
saves and commits take alone and loads share (:mod:`memlong.storage`).

:func:`interrupts_held` keeps Ctrl-C (and SIGTERM / SIGALRM handlers) out of every read and write the lock
guards, bookkeeping included: the signal's handler runs when the block ends. A ``KeyboardInterrupt`` raised between
two lines of a change left the bank half-changed (counted but not indexed) or the lock held for ever (the next call
hung). Waits for this lock and for :func:`dir_lock` stay interruptible: a handler runs there at once, never with the
lock's mutex held, and itself runs with signals held (a Ctrl-C while it runs comes after it, in the wait). One that
uses the bank whose call it interrupted does not wait for itself: a read is not held back by this thread's own
waiting write (only by another thread's); a change waits its turn and is made before the interrupted call, except
inside that thread's own write (a commit waiting for another process's lock), where it raises RuntimeError, as
does the interrupted write if the handler left a read open."""

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
    """The main thread's held signals (only it runs Python signal handlers). Fields that must change together are
    set in one statement, so that a signal between two lines leaves them consistent."""
    depth = 0  # open interrupts_held blocks on the main thread; 0: _hold passes a signal straight on
    waiting = False  # inside an interruptible wait: the first signal's handler runs at once
    saved: dict[int, Any] = {}  # signal -> the handler _hold stands in for
    pending: list[tuple[Any, int, Any]] = []  # (the handler it stood in for, signal, frame), in arrival order
    deferred: list[tuple[int, Any, Any]] = []  # swaps of first blocks that ended before a later one (generators)


def _hold(signum: int, frame: Any) -> None:
    handler = _Held.saved.get(signum)
    if _Held.depth and not _Held.waiting:
        _Held.pending.append((handler, signum, frame))
        return
    if not callable(handler):
        return
    if not _Held.depth:
        handler(signum, frame)
        return
    # In a wait: the handler runs held (its own bank calls' bookkeeping must not be cut either), then the handlers of
    # signals that came meanwhile, and the wait goes on interruptible. Raising: the wait ends, later signals held.
    mark, _Held.waiting = len(_Held.pending), False
    handler(signum, frame)
    while True:
        while len(_Held.pending) > mark:
            late, _Held.pending = _Held.pending[mark:], _Held.pending[:mark]
            _deliver(late)
        _Held.waiting = True
        if len(_Held.pending) <= mark:  # (one that came before the line above is run now, not left to the block)
            return
        _Held.waiting = False


def _deliver(pending: list[tuple[Any, int, Any]], current: BaseException | None = None) -> None:
    """Run every held signal's handler in order (a SIGTERM's after a Ctrl-C's), then raise the first exception they
    raised (a ``SystemExit`` before any other: a request to exit is not lost behind a Ctrl-C, not even one already
    raised, ``current``, by a handler run in a wait)."""
    error: BaseException | None = None
    for handler, signum, frame in pending:
        if callable(handler):
            try:
                handler(signum, frame)
            except BaseException as exc:  # (a SIGTERM's SystemExit wins over a Ctrl-C held before it)
                if error is None or (isinstance(exc, SystemExit) and not isinstance(error, SystemExit)):
                    error = exc
    if error is not None and not (isinstance(current, SystemExit) and not isinstance(error, SystemExit)):
        raise error


class _HeldBlock:
    """One ``with interrupts_held():`` block (a class, not a generator: it runs on every call into a bank). It swaps
    in :func:`_hold` for the handlers not already held (a handler set by the caller inside an open block too) and
    puts back exactly those on exit; the outermost exit runs what was held."""

    __slots__ = ("swapped", "first")

    def __enter__(self) -> None:
        self.swapped: list[tuple[int, Any, Any]] | None = None  # (signal, handler put back, saved before)
        if threading.current_thread() is not threading.main_thread():
            return
        if not _Held.depth:
            _Held.waiting = False
        swapped: list[tuple[int, Any, Any]] = []
        try:
            for sig in HELD_SIGNALS:
                handler = _sig.getsignal(sig)
                if handler is _hold:
                    if _Held.depth:
                        continue  # held by an open block
                    handler = _Held.saved.get(sig)  # left by an exit a signal cut short: put it back this time
                if callable(handler):  # not SIG_DFL / SIG_IGN / a handler set outside Python
                    swapped.append((sig, handler, _Held.saved.get(sig)))
                    _Held.saved[sig] = handler  # (before the swap: until the block counts, _hold passes signals on)
                    try:
                        _sig.signal(sig, _hold)
                    except ValueError:  # not the main interpreter: nothing to hold
                        swapped.pop()
                        break
            self.swapped, self.first, _Held.depth = swapped, not _Held.depth, _Held.depth + 1  # (counted, at once)
        except BaseException:
            for sig, handler, _ in reversed(swapped):
                if _sig.getsignal(sig) is _hold:
                    _sig.signal(sig, handler)
            raise

    def __exit__(self, *exc: object) -> None:
        if self.swapped is None:
            return
        if threading.current_thread() is not threading.main_thread():  # a generator closed in another thread: the
            _Held.depth -= 1  # handlers stay swapped (passing signals on once depth is 0) until the next block
            if not _Held.depth and hasattr(signal, "pthread_kill"):
                pending, _Held.pending = _Held.pending, []
                for signum in dict.fromkeys(s for _, s, _ in pending):  # raised in the main thread, where it runs
                    signal.pthread_kill(threading.main_thread().ident or 0, signum)
            return
        pending: list[tuple[Any, int, Any]] = []
        try:  # (a signal once the pending ones are taken must not skip their delivery)
            restore = self.swapped[::-1]
            if _Held.depth == 1:
                pending, deferred, _Held.pending, _Held.deferred, _Held.depth = _Held.pending, _Held.deferred, [], [], 0
                restore += deferred[::-1]
            else:
                _Held.depth -= 1
                if self.first:  # ended before a block opened after it (generators): its handlers stay held until the
                    _Held.deferred, restore = _Held.deferred + self.swapped, []  # last
            for sig, handler, before in restore:
                if _sig.getsignal(sig) is _hold:
                    _sig.signal(sig, handler)
                if before is not None:
                    _Held.saved[sig] = before
        finally:
            _deliver(pending, exc[1] if len(exc) > 1 and isinstance(exc[1], BaseException) else None)


def interrupts_held() -> contextlib.AbstractContextManager[None]:
    """Run the block with SIGINT, SIGTERM and SIGALRM handlers held (those set from Python: Ctrl-C's
    ``KeyboardInterrupt``, a handler raising ``SystemExit``); the handlers of signals that came meanwhile run when
    the outermost block ends, each once, in order (see :func:`_deliver` for which exception is raised). Blocks
    nest, and a first block may end before a later one (generators); threads other than the main one (which never
    run signal handlers) are not affected.

    Example:
        >>> with interrupts_held():
        ...     publish()   # a Ctrl-C now raises after publish() returns, not half-way through it
    """
    return _HeldBlock()


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Inside :func:`interrupts_held`: a wait that a signal arriving during it may end (its handler runs at once;
    signals held before the wait run when the block ends, not inside the caller's lock)."""
    if threading.current_thread() is not threading.main_thread() or not _Held.depth:
        yield
        return
    was, _Held.waiting = _Held.waiting, True
    try:
        yield
    finally:  # (the state before: a wait inside a handler run in another wait leaves that one interruptible)
        _Held.waiting = was


class RWLock:
    """Many readers at once, or one writer. A waiting writer holds back new readers, so a stream of searches
    cannot starve an ingest. Reads nest within a thread; writes do not."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards the fields below; never held while a signal's handler may run
        self._waiters: list[Any] = []  # a locked lock per waiting thread, released to wake it (see _wait)
        self._readers = 0
        self._writer = 0  # the writing thread's id (0: none)
        self._writers_waiting: dict[int, int] = {}  # thread id -> its writes waiting
        self._depth: dict[int, int] = {}  # thread id -> its open read blocks (the lock is held once per thread)
        self._in_write: set[int] = set()  # threads whose reads began inside their own write (not counted)

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared (``with lock.read(): ...``); waits while a writer holds or waits for it, unless
        this thread already reads (a nested read never waits: the waiting writer waits for this thread) or the
        writer is this thread (a signal handler run in its wait: the read goes on, as does one in this thread's
        own waiting write). The body runs with interrupts held, as a write's does."""
        me = threading.get_ident()
        with interrupts_held():
            with self._mutex:
                while True:  # (checked again after each wait: a handler run in it may have left a read open)
                    if self._depth.get(me):
                        break
                    if self._writer == me:  # a signal handler run in this thread's write: not counted, never waits
                        self._in_write.add(me)
                        break
                    # this thread's own waiting write does not hold it back (a handler run in that wait), and is
                    # woken to see the read (one left open makes it raise: it would wait for it)
                    if not (self._writer or len(self._writers_waiting) > (me in self._writers_waiting)):
                        self._readers += 1
                        if me in self._writers_waiting:
                            self._wake_all()
                        break
                    self._wait()
                self._depth[me] = self._depth.get(me, 0) + 1
            try:
                yield
            finally:  # ``me``, not the thread that ends the block: a generator may be closed in another thread
                with self._mutex:
                    self._depth[me] -= 1
                    if not self._depth[me]:
                        del self._depth[me]
                        if me in self._in_write:
                            self._in_write.discard(me)
                        else:
                            self._readers -= 1
                        if not self._readers:
                            self._wake_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock alone (``with lock.write(): ...``); waits until the readers inside have left. The body
        runs with interrupts held (:func:`interrupts_held`): a change is made whole, then Ctrl-C raises.

        Raises:
            RuntimeError: this thread holds a read (within ``MemoryBank.reading()``) or the write (a signal handler
                run in a commit's wait for another process, a warnings hook run in an add); it would wait for itself.
        """
        me = threading.get_ident()
        if self._depth.get(me):
            raise RuntimeError("A memory bank cannot be changed inside its own `with bank.reading():` block (the "
                               "change would wait for the block to end); change it after the block.")
        if self._writer == me:
            raise RuntimeError("A memory bank cannot be changed from code that runs inside this thread's own change "
                               "of it (a signal handler run while a commit waits for another process's lock, a "
                               "warnings or logging hook run during an add); change it after that call returns.")
        with interrupts_held():
            with self._mutex:
                self._writers_waiting[me] = self._writers_waiting.get(me, 0) + 1  # (2: a handler in its own wait)
                try:
                    while self._writer or self._readers:
                        self._wait()
                        if self._depth.get(me):  # a handler run in the wait left a read open: it would wait for it
                            raise RuntimeError("A memory bank cannot be changed while this thread reads it (a signal "
                                               "handler run while the change waited left a read of it open); "
                                               "change it after that read ends.")
                except BaseException:  # interrupted while waiting (Ctrl-C): the readers held back for it may go on
                    self._wake_all()
                    raise
                finally:
                    if self._writers_waiting[me] == 1:
                        del self._writers_waiting[me]
                    else:
                        self._writers_waiting[me] -= 1
                self._writer = me
            try:
                yield
            finally:
                with self._mutex:
                    if me in self._in_write:  # a read begun in this write is still open (a generator): now counted
                        self._in_write.discard(me)
                        self._readers += 1
                    self._writer = 0
                    self._wake_all()

    def _wait(self, timeout: float = -1) -> None:
        """Sleep until :meth:`_wake_all` (called with ``_mutex`` held, held again on return). Not
        ``threading.Condition.wait``: a signal's handler runs there at once, in the wait, and could run with the
        mutex held (in its last bytecodes before releasing it, or re-taking it), where a handler using the bank hung
        and an exception left the mutex unheld. Here only the sleep itself is interruptible."""
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._mutex.release()
        try:
            with _interruptible():
                waiter.acquire(timeout=timeout)
        finally:
            self._mutex.acquire()  # (signals held again: a handler cannot cut this short)
            if waiter in self._waiters:  # not woken: interrupted, or timed out
                self._waiters.remove(waiter)

    def _wake_all(self) -> None:
        """Wake every waiting thread (with ``_mutex`` held); each checks its condition again."""
        for waiter in self._waiters:
            waiter.release()
        self._waiters.clear()


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
        with _interruptible():  # (a commit waiting for another process's lock: Ctrl-C ends the wait)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
