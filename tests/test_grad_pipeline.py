"""The gradient pipeline's ordering rules, driven directly (CPU: downloads land as they are issued).

Rules (runtime/grad_pipeline.py): among fully landed units and background work the lowest index is
consumed first (landed units first when the parking pool runs short), only chunks whose copy has completed
(with none, background work, never a wait on one copy while other work is ready); items of one unit keep their
order; a task runs after everything before it and before everything after it; a unit larger than the
parking pool streams through it; a failure reaches every later future.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import UpdateSpec
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.grad_pipeline import GradPipeline
from slideformer.runtime.transfer import Accumulate, Update


class RecordingAdam:
    """Stands in for FlatAdamW: records (unit, lo) calls; can hold the optimizer thread on a gate."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on: int | None = None

    def update(self, unit, lo, hi, grad, spec, out=None) -> None:
        self.entered.set()
        self.gate.wait(10)
        if unit.index == self.fail_on:
            raise RuntimeError("injected")
        self.calls.append((unit.index, lo))


def _unit(i: int, n: int) -> HostUnit:
    u = HostUnit(i, f"u{i}", [(f"p{i}", nn.Parameter(torch.zeros(n)))])
    u.allocate(with_grad_acc=True)
    return u


def _pipeline(adam, pool_chunks: int = 8, chunk: int = 4) -> GradPipeline:
    return GradPipeline(DeviceOps(torch.device("cpu")), chunk, pool_chunks, torch.float32, adam)


def _update(units) -> Update:
    return Update({u.index: UpdateSpec(step=1, lr=1e-3) for u in units})


def _wait_landed(p: GradPipeline, count: int) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        with p._cv:
            if sum(1 for it in p._pending if getattr(it, "landed", False)) >= count:
                return
        time.sleep(0.01)
    raise AssertionError("downloads did not land")


def test_backlog_is_consumed_lowest_unit_first() -> None:
    adam = RecordingAdam()
    p = _pipeline(adam)
    units = {i: _unit(i, 4) for i in range(1, 6)}
    adam.gate.clear()  # hold the optimizer on the first unit
    futs = [p.submit_drain([(units[5], torch.ones(4))], None, None, _update([units[5]]))]
    assert adam.entered.wait(10)  # the optimizer is inside unit 5 before the others arrive
    for i in (4, 3, 2, 1):  # backward produces units top-down
        futs.append(p.submit_drain([(units[i], torch.ones(4))], None, None, _update([units[i]])))
    _wait_landed(p, 5)
    adam.gate.set()
    for f in futs:
        for fut in f.values():
            fut.result(10)
    assert [u for u, _ in adam.calls] == [5, 1, 2, 3, 4]
    p.close()


def test_same_unit_items_keep_their_order_and_tasks_are_barriers() -> None:
    p = _pipeline(RecordingAdam())
    a, b = _unit(1, 6), _unit(2, 6)
    seen = []
    f1 = p.submit_drain([(b, torch.full((6,), 2.0))], None, None, Accumulate(first=True, last=False, host_norm=True))
    f2 = p.submit_drain([(a, torch.full((6,), 1.0))], None, None, Accumulate(first=True, last=False, host_norm=True))
    f3 = p.submit_drain([(b, torch.full((6,), 3.0))], None, None, Accumulate(first=False, last=True, host_norm=True))
    task = p.submit_task(lambda: seen.append((b.grad_acc.clone(), a.grad_acc.clone())) or "ran")
    f4 = p.submit_drain([(a, torch.full((6,), 5.0))], None, None, Accumulate(first=False, last=True, host_norm=True))
    for f in (f1, f2, f3, f4):
        for fut in f.values():
            fut.result(10)
    assert task.result(10) == "ran"
    acc_b, acc_a = seen[0]
    assert torch.equal(acc_b, torch.full((6,), 5.0))  # first copied, then added: 2 + 3
    assert torch.equal(acc_a, torch.full((6,), 1.0))  # the item after the task had not run yet
    assert torch.equal(a.grad_acc, torch.full((6,), 6.0))
    assert b.sq_norm == pytest.approx(6 * 25.0)
    p.close()


def test_unit_larger_than_the_pool_streams_through_it() -> None:
    adam = RecordingAdam()
    p = _pipeline(adam, pool_chunks=2, chunk=4)
    big = _unit(3, 4 * 7 + 1)  # 8 chunks through a 2-chunk pool
    fut = p.submit_drain([(big, torch.ones(big.numel))], None, None, _update([big]))
    fut[3].result(10)
    assert [lo for _, lo in adam.calls] == list(range(0, big.numel, 4))
    p.close()


def test_a_failure_reaches_this_and_every_later_future_without_deadlock() -> None:
    adam = RecordingAdam()
    adam.fail_on = 2
    p = _pipeline(adam, pool_chunks=2, chunk=4)
    units = [_unit(i, 12) for i in (3, 2, 1)]
    futs = [p.submit_drain([(u, torch.ones(12))], None, None, _update([u])) for u in units]
    with pytest.raises(RuntimeError, match="injected"):
        futs[1][2].result(10)
    with pytest.raises(RuntimeError, match="injected"):
        futs[2][1].result(10)
    later = p.submit_task(lambda: "never")
    with pytest.raises(RuntimeError, match="injected"):
        later.result(10)
    p.close()


def test_background_work_of_a_lower_unit_goes_first_and_keeps_its_unit_order() -> None:
    """Background work (the split embedding update's early part, unit 0) is consumed by unit index like a
    landed gradient: the next forward reads the embedding first, so it goes before the layers; its own unit's
    later item and a later task wait for it to finish."""
    adam = RecordingAdam()
    p = _pipeline(adam)
    emb, layers = _unit(0, 8), {i: _unit(i, 4) for i in (1, 2, 3)}
    log: list[str] = []

    def steps():
        for k in range(3):
            adam.calls.append((-1, k))  # one chunk of background work
            yield

    adam.gate.clear()  # hold the optimizer inside layer 3 while the rest is queued
    f3 = p.submit_drain([(layers[3], torch.ones(4))], None, None, _update([layers[3]]))
    assert adam.entered.wait(10)
    bg = p.submit_background(emb, steps)
    f2 = p.submit_drain([(layers[2], torch.ones(4))], None, None, _update([layers[2]]))
    f1 = p.submit_drain([(layers[1], torch.ones(4))], None, None, _update([layers[1]]))
    f0 = p.submit_drain([(emb, torch.ones(8))], None, None, _update([emb]))  # the unit's next item
    task = p.submit_task(lambda: log.append("task"))
    _wait_landed(p, 4)  # layers 3, 2, 1 and the embedding's drain
    adam.gate.set()
    for fut in (f3[3], f2[2], f1[1], bg, f0[0], task):
        fut.result(10)
    # The background work (unit 0) before the layers that landed while it waited; the embedding's own drain
    # right after it (still the lowest unit), then the layers bottom-up, and the task after everything.
    assert adam.calls == [(3, 0), (-1, 0), (-1, 1), (-1, 2), (0, 0), (0, 4), (1, 0), (2, 0)]
    assert log == ["task"]


def test_landed_units_go_before_background_work_when_the_pool_runs_short() -> None:
    """With fewer than a quarter of the parking chunks free, a landed unit is consumed (freeing its chunks for
    the downloader, which the GPU's slot release waits on) before background work of a lower unit."""
    adam = RecordingAdam()
    p = _pipeline(adam, pool_chunks=4, chunk=4)  # reserve: 1 free chunk
    emb, layers = _unit(0, 8), {i: _unit(i, 8) for i in (1, 2)}
    gate, entered = threading.Event(), threading.Event()

    def steps():
        for k in range(2):
            entered.set()
            gate.wait(10)  # the first step holds the optimizer while both layers land
            adam.calls.append((-1, k))
            yield

    bg = p.submit_background(emb, steps)
    assert entered.wait(10)
    f2 = p.submit_drain([(layers[2], torch.ones(8))], None, None, _update([layers[2]]))
    f1 = p.submit_drain([(layers[1], torch.ones(8))], None, None, _update([layers[1]]))
    _wait_landed(p, 2)
    assert len(p._free) == 0  # 2 + 2 chunks parked
    gate.set()
    for fut in (f2[2], f1[1], bg):
        fut.result(10)
    # No chunk free: a chunk of layer 1 (the lowest landed) before the background's next step; then a chunk is
    # free again and the background work (unit 0) goes before the rest of the layers.
    assert adam.calls == [(-1, 0), (1, 0), (-1, 1), (1, 4), (2, 0), (2, 4)]
    p.close()


def test_background_drain_is_consumed_chunk_by_chunk_and_never_deadlocks_a_small_pool() -> None:
    """A background drain larger than the pool streams through it, one landed chunk per turn, while a
    later unit streams behind it: every parking chunk is freed and both finish."""
    adam = RecordingAdam()
    p = _pipeline(adam, pool_chunks=2, chunk=4)
    emb, layer = _unit(0, 24), _unit(1, 16)
    f0 = p.submit_drain([(emb, torch.ones(24))], None, None, _update([emb]), frozenset({0}))
    f1 = p.submit_drain([(layer, torch.ones(16))], None, None, _update([layer]))
    f0[0].result(10)
    f1[1].result(10)
    assert sorted(adam.calls) == [(0, lo) for lo in range(0, 24, 4)] + [(1, lo) for lo in range(0, 16, 4)]
    assert len(p._free) == 2


def test_a_lower_unit_landing_mid_unit_goes_next_after_one_chunk() -> None:
    """Drains are consumed a chunk per turn: the embedding's gradient (unit 0), the last of backward, does not
    wait for the rest of a layer whose update had begun."""
    adam = RecordingAdam()
    p = _pipeline(adam)
    layer, emb = _unit(5, 12), _unit(0, 4)
    adam.gate.clear()  # hold the optimizer inside the layer's first chunk
    f5 = p.submit_drain([(layer, torch.ones(12))], None, None, _update([layer]))
    assert adam.entered.wait(10)
    f0 = p.submit_drain([(emb, torch.ones(4))], None, None, _update([emb]))
    _wait_landed(p, 2)
    adam.gate.set()
    f5[5].result(10)
    f0[0].result(10)
    assert adam.calls == [(5, 0), (0, 0), (5, 4), (5, 8)]
    p.close()


class _Copy:
    """A device-to-host copy that completes when the test says so."""

    def __init__(self, done: bool) -> None:
        self.flag = threading.Event()
        if done:
            self.flag.set()


class InFlightOps(DeviceOps):
    """CPU ops whose gradient copies, while ``hold`` is set, stay in flight until ``release()``: what the GPU
    does when the main thread has queued a layer's backward and its download but the GPU has not run them."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.hold = False
        self.held: list[_Copy] = []

    def record(self, stream):
        ev = _Copy(done=not self.hold)
        if self.hold:
            self.held.append(ev)
        return ev

    def done(self, event) -> bool:
        return event is None or event.flag.is_set()

    def host_wait(self, event) -> None:
        if event is not None and not event.flag.wait(10):
            raise AssertionError("a copy never completed")

    def release(self) -> None:
        for ev in self.held:
            ev.flag.set()


def test_a_landed_unit_whose_copy_is_in_flight_does_not_hold_up_ready_work() -> None:
    """A unit lands when its copies are queued; the optimizer consumes a higher unit whose copies completed
    rather than block on the lower one's copy (session 8's 8B timeline idled ~300 ms of backward so)."""
    adam, ops = RecordingAdam(), InFlightOps()
    p = GradPipeline(ops, 4, 8, torch.float32, adam)
    layers = {i: _unit(i, 8) for i in (1, 2)}
    adam.gate.clear()  # hold the optimizer inside layer 2's first chunk
    f2 = p.submit_drain([(layers[2], torch.ones(8))], None, None, _update([layers[2]]))
    assert adam.entered.wait(10)
    _wait_landed(p, 1)  # every copy of layer 2 recorded (done) before the hold starts
    ops.hold = True  # layer 1's copies are queued behind a backward the GPU has not run yet
    f1 = p.submit_drain([(layers[1], torch.ones(8))], None, None, _update([layers[1]]))
    _wait_landed(p, 2)
    adam.gate.set()
    f2[2].result(5)  # done while layer 1's copies are still in flight
    assert adam.calls == [(2, 0), (2, 4)] and not f1[1].done()
    ops.release()
    f1[1].result(10)
    assert adam.calls == [(2, 0), (2, 4), (1, 0), (1, 4)]
    p.close()


def test_background_work_runs_while_the_landed_units_copies_are_in_flight_even_when_the_pool_is_short() -> None:
    """The pool-reserve rule puts landed units before background work, but only those it can consume now:
    with the only landed unit's copies in flight, the background work goes on instead of waiting."""
    adam, ops = RecordingAdam(), InFlightOps()
    p = GradPipeline(ops, 4, 2, torch.float32, adam)  # reserve: 1 free chunk
    emb, layer = _unit(0, 8), _unit(1, 8)
    ops.hold = True
    f1 = p.submit_drain([(layer, torch.ones(8))], None, None, _update([layer]))
    _wait_landed(p, 1)
    assert len(p._free) == 0  # the pool is short: both chunks parked, their copies in flight

    def steps():
        for k in range(3):
            adam.calls.append((-1, k))
            yield

    p.submit_background(emb, steps).result(5)
    assert adam.calls == [(-1, 0), (-1, 1), (-1, 2)] and not f1[1].done()
    ops.release()
    f1[1].result(10)
    assert adam.calls[3:] == [(1, 0), (1, 4)]
    p.close()
