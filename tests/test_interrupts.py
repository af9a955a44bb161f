"""Ctrl-C at any line of a bank change (review finding): a ``KeyboardInterrupt`` raised
between two lines of ``add_chunks``, ``delete``, ``reset`` or ``restore`` left the bank half-changed (chunks counted
but not indexed) or its lock held for ever (the next call hung). Each test raises a real SIGINT at every line event
inside memlong in turn (``sys.settrace``) and checks after each: the lock is free, the handler is restored, the
bank's invariants hold (tests/test_bank_stateful.py), and the bank is as before the call or as after it."""

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_bank_stateful import CAPACITY, BankMachine
from test_persistence import HashEmbedder

from memlong import MemoryBank, rwlock
from memlong.rwlock import RWLock, interrupts_held


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Python's own SIGINT handler for each test: a runner started in the background (``cmd &`` in a script) starts
    Python with SIGINT ignored, and then no Ctrl-C reaches it (these tests failed, and the commit one hung)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_at(n, call):
    """Run ``call()`` with a SIGINT raised at the ``n``-th line executed inside memlong; True if it was raised
    (the call ended in KeyboardInterrupt), False if the call has fewer lines (it ran to the end)."""
    seen = 0

    def tracer(frame, event, arg):
        nonlocal seen
        if "memlong" not in frame.f_code.co_filename.replace("\\", "/").split("/"):
            return None
        if event == "line":
            seen += 1
            if seen == n:
                signal.raise_signal(signal.SIGINT)
        return tracer

    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    assert seen < n, "the SIGINT was raised but no KeyboardInterrupt came"
    return False


def contents(bank):
    """Every namespace's chunks as comparable values (ids left out: each run gives new ones)."""
    out = {}
    for ns in bank.namespaces():
        chunks = [bank.get(i, namespace=ns) for i in bank.chunk_ids(ns)]
        out[ns] = [(c.text, c.doc_id, c.span, c.metadata, c.keys.tolist()) for c in chunks]
    return out


def fresh_bank():
    bank = MemoryBank(embedder=HashEmbedder(), capacity=CAPACITY, max_bytes=40_000, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for i, ns in enumerate(["alice", "alice", "bob", "carol"]):
        keys = torch.randn(2, 2, 6, 4, generator=gen)
        bank.add_chunks([f"chunk {i} of {ns}"], keys=[keys], values=[keys * 2], namespace=ns, doc_id=f"d{i % 2}")
    return bank


def _add(n_tokens):
    def add(bank):
        keys = torch.ones(2, 2, n_tokens, 4)
        bank.add_chunks(["new one", "new two"], keys=[keys] * 2, values=[keys * 2] * 2, namespace="alice",
                        doc_id="d9", metadata=[{"k": 1}, {"k": 2}])
    return add


OPERATIONS = {
    "add": _add(5),
    "add-evicting": _add(24),  # 2 x 24 tokens + 12 stored > CAPACITY (60): older chunks are evicted
    "delete-doc": lambda bank: bank.delete(namespace="alice", doc_id="d0"),
    "reset": lambda bank: bank.reset("bob"),
    "search": lambda bank: bank.search("chunk", namespace="alice", k=2, mode="hybrid"),
}


def read_elsewhere(bank):
    """Hold ``bank.reading()`` in another thread until the returned event is set; returns (thread, release)."""
    inside, release = threading.Event(), threading.Event()

    def reader():
        with bank.reading():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=reader)
    thread.start()
    inside.wait(10)
    return thread, release


def held_elsewhere(hold):
    """Hold ``hold()`` (a lock's read or write) in another thread for 0.3 s; returns the thread."""
    inside, release = threading.Event(), threading.Event()

    def body():
        with hold():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=body)
    thread.start()
    inside.wait(10)
    threading.Timer(0.3, release.set).start()
    return thread


def ctrl_c_then_sigterm_held():
    """A SIGINT, then a SIGTERM, both raised inside one held block."""
    with interrupts_held():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.01)  # (signal handlers run between bytecodes: they would have run by now)


def check_lock_free(lock):
    """(Takes the lock, not the bank: pytest's report of a failure would call the bank's repr, which waits for it.)"""
    assert lock._mutex.acquire(timeout=1), "the lock's mutex was left held: the next call would hang"
    lock._mutex.release()
    assert not lock._writer and not lock._readers and not lock._writers_waiting and not lock._depth
    assert not lock._in_write and not lock._waiters


def check_after_interrupt(bank, before, after):
    check_lock_free(bank._lock)
    assert rwlock._Held.depth == 0 and not rwlock._Held.pending  # nothing held any more, nothing left to deliver
    # a signal that cut a block's exit short leaves _hold in place, passing signals on: the next call puts it back
    assert signal.getsignal(signal.SIGINT) in (signal.default_int_handler, rwlock._hold)
    bank.num_chunks()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    BankMachine.aligned_bounded_isolated(SimpleNamespace(bank=bank))
    assert contents(bank) in (before, after)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_sigint_at_any_line_of_a_change_leaves_it_whole_or_undone(operation):
    call = OPERATIONS[operation]
    reference = fresh_bank()
    before = contents(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the evicting add warns
        call(reference)
        after = contents(reference)
        n, interrupted = 0, True
        while interrupted:
            n += 1
            bank = fresh_bank()
            interrupted = interrupt_at(n, functools.partial(call, bank))
            check_lock_free(bank._lock)
            check_after_interrupt(bank, before, after)
    assert n > 20  # the change ran through many lines, each one interrupted once


def test_restore_interrupted_at_any_line_leaves_the_bank_whole(tmp_path):
    source = fresh_bank()
    source.save(tmp_path / "saved", namespaces=["bob", "carol"])
    target = MemoryBank(embedder=HashEmbedder(), capacity=CAPACITY, max_bytes=40_000, dtype=torch.float32)
    keys = torch.zeros(2, 2, 3, 4)
    target.add_chunks(["mine"], keys=[keys], values=[keys * 2], namespace="bob", doc_id="m")
    before = contents(target)
    target.restore(tmp_path / "saved", namespaces=["bob"])
    after = contents(target)
    n, interrupted = 0, True
    while interrupted:
        n += 1
        bank = MemoryBank(embedder=HashEmbedder(), capacity=CAPACITY, max_bytes=40_000, dtype=torch.float32)
        bank.add_chunks(["mine"], keys=[keys], values=[keys * 2], namespace="bob", doc_id="m")
        interrupted = interrupt_at(n, functools.partial(bank.restore, tmp_path / "saved", namespaces=["bob"]))
        check_lock_free(bank._lock)
        check_after_interrupt(bank, before, after)
    assert n > 50


def test_a_held_interrupt_is_raised_when_the_block_ends_and_a_wait_stays_interruptible():
    order = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)  # (signal handlers run between bytecodes: it would have raised by now)
            order.append("block finished")
    assert order == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    bank = fresh_bank()
    thread, release = read_elsewhere(bank)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))  # as Ctrl-C: to the process
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        bank.delete(namespace="alice", doc_id="d0")  # waits for the reader; Ctrl-C ends the wait
    assert time.monotonic() - started < 5
    release.set()
    thread.join(10)
    assert bank.delete(namespace="alice", doc_id="d0") == 1  # the lock is free again


def test_held_signals_with_handlers_set_inside_and_several_signals():
    """Review findings on the first version: a handler the caller set inside a held block became permanent after a
    nested block; a signal held in the nested block was delivered twice, one held before it lost; a SIGTERM held
    behind a Ctrl-C never reached its handler."""
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)  # held for the default handler
            old = signal.signal(signal.SIGINT, mine)  # the caller's own handler, set inside the block
            with interrupts_held():  # (a bank call)
                signal.raise_signal(signal.SIGINT)  # held for `mine`
                time.sleep(0.01)
            assert seen == [] and signal.getsignal(signal.SIGINT) is mine
            signal.signal(signal.SIGINT, old)
    assert seen == [signal.SIGINT]  # once; and the default handler's KeyboardInterrupt came too
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and rwlock._Held.depth == 0

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(KeyboardInterrupt):
            ctrl_c_then_sigterm_held()
        assert seen == [signal.SIGINT, signal.SIGTERM]  # both, in order
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_commit_waiting_for_another_processs_lock_is_interruptible(tmp_path):
    """Review finding on the first version: a commit waiting for another process's lock on the bank directory held
    Ctrl-C for as long as that process kept it (the flock wait ran inside the held write)."""
    import fcntl

    from test_persistence import fill

    bank = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(bank, "ns", 2)
    bank.commit()
    fill(bank, "ns", 1, seed=5)
    other = os.open(tmp_path / "b" / ".lock", os.O_RDONLY)  # another open file: as another process's lock
    try:
        fcntl.flock(other, fcntl.LOCK_SH)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            bank.commit()
        assert time.monotonic() - started < 5
    finally:
        os.close(other)
    bank.commit()  # the lock is free again; nothing was half-written
    assert len(MemoryBank.load(tmp_path / "b", embedder=HashEmbedder(), verify=True)) == 3


def test_held_handlers_run_outside_the_locks_and_a_block_closed_elsewhere_raises_in_the_main_thread():
    """Review findings on the first version: a held SIGTERM whose handler reads another bank ran inside that bank's
    lock wait, under its mutex, and hung; a read block opened by a generator in the main thread and closed in a
    worker thread dropped the Ctrl-C held meanwhile."""
    a, b = fresh_bank(), fresh_bank()
    counted = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: counted.append(b.num_chunks()))
    thread = held_elsewhere(b._lock.write)
    try:
        with a.reading():
            os.kill(os.getpid(), signal.SIGTERM)  # held: a is being read
            time.sleep(0.01)
            b.search("chunk", namespace="alice")  # waits for b's writer (the held handler must not run in there)
        assert counted == [4]  # ran once, when the read of a ended
    finally:
        signal.signal(signal.SIGTERM, previous)
        thread.join(10)

    def reader():
        with a.reading():
            yield

    opened = reader()
    next(opened)  # a read block open in the main thread
    signal.raise_signal(signal.SIGINT)  # held
    with pytest.raises(KeyboardInterrupt):
        closer = threading.Thread(target=opened.close)
        closer.start()
        closer.join(10)
        time.sleep(0.5)  # the held Ctrl-C is raised in the main thread once the block is closed
    assert rwlock._Held.depth == 0


def test_second_review_of_held_signals():
    """Review findings on the second version: a Ctrl-C after a non-raising handler (a logging SIGTERM, asyncio's
    first Ctrl-C) during a lock wait was held until the wait ended; a SIGTERM's SystemExit held behind a Ctrl-C was
    dropped; a block that ended before a later one still open (generators) gave the handlers back too early."""
    bank, logged = fresh_bank(), []
    thread, release = read_elsewhere(bank)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: logged.append(signum))
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            bank.delete(namespace="alice", doc_id="d0")  # waits for the reader
        assert time.monotonic() - started < 5 and logged == [signal.SIGTERM]
    finally:
        release.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
    try:
        with pytest.raises(SystemExit):
            ctrl_c_then_sigterm_held()
    finally:
        signal.signal(signal.SIGTERM, previous)

    def reading():
        with bank.reading():
            yield

    first, second = reading(), reading()
    next(first)
    next(second)
    first.close()  # ends before the second: the second still holds Ctrl-C
    assert signal.getsignal(signal.SIGINT) is rwlock._hold
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.01)
    with pytest.raises(KeyboardInterrupt):
        second.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and rwlock._Held.depth == 0


@pytest.fixture
def hang_alarm():
    """A hang this test looks for raises AssertionError after 5 s instead (SIGALRM's handler runs in lock waits)."""
    def hung(signum, frame):
        raise AssertionError("hung: a signal handler's bank call waited for the call it interrupted")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_handler_using_the_bank_its_call_waits_for_does_not_hang(tmp_path, hang_alarm):
    """Noticed after session 22's reviews: a signal handler runs at once in a lock wait, and one that used the same
    bank hung for ever: a SIGTERM handler reading the bank while this thread's delete waited for a reader (the read
    waited for that delete), or while a commit waited for another process's directory lock (it waited for the
    commit's own write). The read now goes on; a change there is refused with a RuntimeError instead of a hang."""
    import fcntl

    from test_persistence import fill

    bank, seen = fresh_bank(), []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(bank.num_chunks()))
    thread, release = read_elsewhere(bank)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.6, release.set).start()
        assert bank.delete(namespace="alice", doc_id="d0") == 1
        assert seen == [4]  # read while the delete waited
    finally:
        release.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)
    check_lock_free(bank._lock)

    disk = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(disk, "ns", 2)
    disk.commit()
    fill(disk, "ns", 1, seed=5)
    errors = []

    def handler(signum, frame):
        seen.append(disk.num_chunks())  # a read: goes on (the commit waits, its bank unchanged)
        try:
            disk.commit()  # a change: refused, not a hang
        except RuntimeError as exc:
            errors.append(str(exc))

    other = os.open(tmp_path / "b" / ".lock", os.O_RDONLY)  # another open file: as another process's lock
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.6, os.close, (other,)).start()
        disk.commit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [4, 3] and len(errors) == 1 and "inside this thread's own change" in errors[0]
    check_lock_free(disk._lock)
    assert len(MemoryBank.load(tmp_path / "b", embedder=HashEmbedder(), verify=True)) == 3


def _ctrl_c_in_a_handlers_bank_call(n):
    """A delete waits for a reader; a SIGTERM handler run in that wait reads the bank, and a SIGINT is raised at the
    ``n``-th line inside memlong of that read. Returns (the bank, whether the read had an ``n``-th line)."""
    bank, lines = fresh_bank(), []

    def tracer(frame, event, arg):
        if "memlong" not in frame.f_code.co_filename.replace("\\", "/").split("/"):
            return None
        if event == "line":
            lines.append(1)
            if len(lines) == n:
                signal.raise_signal(signal.SIGINT)
        return tracer

    def handler(signum, frame):
        sys.settrace(tracer)
        try:
            bank.num_chunks()
        finally:
            sys.settrace(None)

    previous = signal.signal(signal.SIGTERM, handler)
    thread, release = read_elsewhere(bank)
    try:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.3, release.set).start()
        with contextlib.suppress(KeyboardInterrupt):
            bank.delete(namespace="alice", doc_id="d0")
    finally:
        release.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)
    return bank, len(lines) >= n


def test_review_of_handlers_that_use_the_bank_in_a_wait(tmp_path):
    """Review findings on the version that let a handler in a wait use its bank: the handler ran with signals not
    held, so a Ctrl-C inside its bank call left the lock's reader count or mutex held (the next write hung); after
    a handler that itself waited, the rest of the outer wait ignored Ctrl-C; a read the handler left open (a
    generator) stopped counting once the write it began in ended, so another thread's delete went through it."""
    import fcntl

    from test_persistence import fill

    for n in range(1, 400):
        bank, reached = _ctrl_c_in_a_handlers_bank_call(n)
        check_lock_free(bank._lock)
        assert rwlock._Held.depth == 0 and not rwlock._Held.pending and not rwlock._Held.waiting
        if not reached:  # every line of the handler's call was tried
            break
    assert n > 20

    disk = MemoryBank(embedder=HashEmbedder(), path=tmp_path / "b", dtype=torch.float32)
    fill(disk, "ns", 3, doc_id="doc")
    disk.commit()
    fill(disk, "ns", 1, seed=5)
    opened = []

    def reading():
        with disk.reading():
            yield disk.chunk_ids("ns")
            yield [disk.get(i, namespace="ns").text for i in disk.chunk_ids("ns")]

    def handler(signum, frame):
        disk.save(tmp_path / "elsewhere")  # passes through an interruptible wait of its own
        opened.append(reading())
        next(opened[0])  # a read left open

    other = os.open(tmp_path / "b" / ".lock", os.O_RDONLY)  # another open file: as another process's lock
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            disk.commit()  # waits for the other lock for as long as it is held: Ctrl-C ends the wait
        assert time.monotonic() - started < 3
    finally:
        os.close(other)
        signal.signal(signal.SIGTERM, previous)
    assert disk._lock._readers == 1  # the handler's read, still open, counts now that the write has ended
    deleter = threading.Thread(target=disk.delete, kwargs={"namespace": "ns", "doc_id": "doc"})
    deleter.start()
    deleter.join(0.5)
    assert deleter.is_alive()  # waits for that read
    assert len(next(opened[0])) == 4
    opened[0].close()
    deleter.join(10)
    assert not deleter.is_alive() and disk.num_chunks("ns") == 1
    disk.commit()
    check_lock_free(disk._lock)


def test_second_review_of_handlers_in_a_wait():
    """Second review: a handler run in a read's wait that left a read open (a generator) made the thread count twice
    (every later write hung); one run in a write's wait made the write wait for itself; a SIGTERM handler's
    ``SystemExit`` raised in a wait lost to a Ctrl-C held while it ran."""
    lock, opened = RWLock(), []

    def reading():
        with lock.read():
            yield

    def leave_a_read_open(signum, frame):
        opened.append(reading())
        next(opened[-1])

    previous = signal.signal(signal.SIGTERM, leave_a_read_open)
    try:
        thread = held_elsewhere(lock.write)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with lock.read():  # waits for the writer; the handler's read waits too, then stays open
            pass
        thread.join(10)
        opened.pop().close()
        check_lock_free(lock)  # (the reader count was left at 1)

        thread = held_elsewhere(lock.read)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(RuntimeError, match="while this thread reads it"):
            with lock.write():  # waits for the reader; the handler's read goes on and stays open
                pass
        thread.join(10)
        opened.pop().close()
        check_lock_free(lock)

        def exit_slowly(signum, frame):
            time.sleep(0.3)  # (saving the bank, say) while the user presses Ctrl-C
            raise SystemExit(3)

        signal.signal(signal.SIGTERM, exit_slowly)
        thread = held_elsewhere(lock.read)
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(SystemExit):
            with lock.write():
                pass
        thread.join(10)
        check_lock_free(lock)
    finally:
        signal.signal(signal.SIGTERM, previous)
