"""A step's slot uses, seen from the main thread: plan, wait, bind, release or fail.

``SlotUses`` is ``StepRunner``'s base (``runtime/step.py``): it plans the forward's uses of the slots
(the embedding rows' source, every streamed layer's forward, the head; planning queues the uploads), waits
for a worker's future under the watchdog, makes the compute stream wait for a use's upload (and, before a
backward, for the earlier uses' gradient downloads), binds a slot's views to the model's parameters, and
fails the release futures a failed step or evaluation still owned. The runner sets the attributes
declared below in its ``__init__``.

Invariant: every release future the main thread plans is in ``open_releases`` until the main thread sets
it or hands it to the gradient worker, so ``abort`` leaves no upload waiting forever; compute reads a slot
only after the compute stream waited for its upload.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from slideformer.errors import WorkerError
from slideformer.memory.host_state import HostUnit
from slideformer.runtime import waits
from slideformer.runtime.batch import MicroBatch
from slideformer.runtime.watchdog import stall_report
from slideformer.runtime.window import Segment, Slot, Use, plan_use

if TYPE_CHECKING:
    from slideformer.runtime.device import DeviceOps
    from slideformer.runtime.engine import Engine


class SlotUses:
    """The main thread's side of the slot-use protocol (a base class: ``StepRunner`` sets the attributes)."""

    e: Engine
    ops: DeviceOps
    layer_segments: list[list[Segment]]
    layer_slot: dict[int, Slot]
    x0_releases: list[Future]
    open_releases: dict[int, Future]

    # -- waiting -----------------------------------------------------------------------------------
    def wait(self, fut: Future | None, what: str) -> Any:
        """Wait for a worker's future; its exception surfaces here with the original chained.

        A wait longer than ``EngineConfig.watchdog_s`` fails with a report instead of hanging.
        """
        if fut is None:
            return None
        try:
            return waits.result(fut, what, self.e.cfg.watchdog_s)
        except FutureTimeout:
            raise WorkerError(stall_report(what, self.e.cfg.watchdog_s, self.e.drain.last_progress)) from None
        except BaseException as exc:
            raise WorkerError(f"{what} failed in a worker thread: {type(exc).__name__}: {exc}") from exc

    def _begin(self, use: Use, backward: bool, what: str) -> None:
        cs = self.ops.compute_stream()
        # Compute must not read the slot before its upload has landed.
        self.ops.wait(cs, self.wait(use.upload, f"upload for {what}"))
        if backward:
            for r in use.earlier_releases:
                # A backward writes the slot's gradient buffer: earlier downloads from it must be done.
                self.ops.wait(cs, self.wait(r, f"gradient download before {what}"))

    # -- planning ----------------------------------------------------------------------------------
    def _submit_upload(self, worker: Any) -> Any:
        def submit(slot: Slot, segments: list[Segment], waits: list[Future]) -> Future:
            updates = [s.unit.update_future for s in segments]
            return worker.submit(worker.upload, slot, segments, updates, waits)
        return submit

    def _plan_forward(self, mb: MicroBatch) -> tuple[Future | Use, Future, dict[int, Use], Use]:
        """Queue the embedding gather and plan the forward's slot uses and the head (queues uploads).

        The embedding rows come from the host master (a gather of this batch's rows), or, when the
        embedding unit is sharded (data-parallel), from the whole matrix uploaded and all-gathered into the
        vocabulary slot (a use of that slot planned ahead of the head's).
        """
        e = self.e
        u0 = e.units[0]
        x0_waits, self.x0_releases = self.x0_releases, []
        up_layer, up_vocab = self._submit_upload(e.layer_up), self._submit_upload(e.vocab_up)
        x0_src: Future | Use
        if u0.sharded:
            cs = self.ops.compute_stream()
            for fut in x0_waits:
                # Set when the previous micro-batch finished with x0 (already resolved by now).
                done = self.wait(fut, "the previous micro-batch's use of the embedding rows")
                for ev in done if isinstance(done, list) else [done]:
                    self.ops.wait(cs, ev)  # its compute and checkpoint copies read x0_dev: they come first
            x0_src = plan_use(e.vocab_slot, [Segment(u0, 0)], True, up_vocab)
        else:
            x0_src = e.vocab_up.submit(e.vocab_up.gather_rows, u0, e.vocab, mb.ids_host, e.x0_dev, e.x0_scratch,
                                       e.x0_stage, u0.update_future, x0_waits)
        x0_release: Future = Future()
        self.x0_releases.append(x0_release)
        fwd = {j: plan_use(self.layer_slot[j], self.layer_segments[j], True, up_layer)
               for j in range(e.num_layers) if j in self.layer_slot}
        head = plan_use(e.vocab_slot, e.head_segments, True, up_vocab)
        for f in (x0_release, head.release, *(u.release for u in fwd.values())):
            self.open_releases[id(f)] = f
        return x0_src, x0_release, fwd, head

    # -- binding -----------------------------------------------------------------------------------
    @staticmethod
    def _bind(unit: HostUnit, views: list[torch.Tensor]) -> None:
        for spec, view in zip(unit.params, views):
            spec.param.data = view

    def _bind_segments(self, segments: list[Segment], views: list[list[torch.Tensor]]) -> None:
        for seg, v in zip(segments, views):
            self._bind(seg.unit, v)

    # -- failing -----------------------------------------------------------------------------------
    def abort(self, exc: BaseException) -> None:
        """Fail the release futures the failed step (or evaluation) still owned, so the upload workers waiting
        for them stop (the engine is marked failed; close() then finds no worker blocked)."""
        for f in self.open_releases.values():
            if not f.done():
                try:
                    f.set_exception(WorkerError(f"the step failed on the main thread: {exc}"))
                except InvalidStateError:
                    pass  # set meanwhile by its owner
        self.open_releases.clear()
