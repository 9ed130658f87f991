"""Preemption: a signal asks the run to stop at a step boundary with a checkpoint.

Slurm sends SIGTERM (or the signal `--signal` asks for) some time before it kills a job, and
torchrun forwards SIGTERM to its workers. Without a handler a run loses everything since its
last periodic checkpoint. While training, each signal of `train.preempt_signals` (default
SIGTERM and SIGUSR1) is only recorded here: the ranks vote on it in the step's own collective
(agdlm.rank_votes), so every rank finishes the step it is in, all of them write one checkpoint
at its boundary, and the run exits with PREEMPTED_EXIT_CODE. A rank that saw the signal never
saves alone.

A second signal while the step or the save runs is counted and changes nothing: the save must
not be cut short by the very signal that asked for it (torchrun forwards SIGTERM to workers
that Slurm has signalled already). SIGKILL still ends the process at once; the checkpoint
writes are atomic (agdlm.checkpoint), so the previous checkpoint stays the newest good one."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL, "try again later": the job script requeues the run
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_name_problem(name) -> str | None:
    """Why `name` cannot be a preemption signal, or None (SIGTERM, SIGUSR1, ...)."""
    sig = getattr(signal, name, None) if isinstance(name, str) else None
    if not isinstance(sig, signal.Signals):
        return f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)"
    if name in UNCATCHABLE:
        return f"{name} cannot be caught"
    return None


class Preempted(Exception):
    """The run stopped for a signal after writing its checkpoint (or keeping the last one)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None, seconds: float):
        self.signal_name, self.step, self.checkpoint, self.seconds = signal_name, step, checkpoint, seconds
        saved = (f"checkpoint {checkpoint} written {seconds:.1f} s after the signal" if checkpoint
                 else "no checkpoint written (AGD was skipping steps; the last good one stays the newest)")
        super().__init__(f"preempted by {signal_name} at step {step}: {saved}; launch the run again to resume "
                         f"(exit {PREEMPTED_EXIT_CODE})")


class SignalWatch:
    """While entered, records the first of `names` to arrive and counts every arrival. Only the
    main thread may install handlers; elsewhere (or with no names) it never sees a signal."""

    def __init__(self, names: list[str] | tuple[str, ...] = ()):
        self.signals = [getattr(signal, name) for name in names]
        self.first: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first
        self.count = 0
        self._previous: dict = {}

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        # No I/O here: the handler may run inside a print or a save, and must not disturb it.
        self.count += 1
        if self.first is None:
            self.first, self.received_at = signal.Signals(signum).name, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.first is not None


# ---- test-only: stop a rank at a known point until a signal comes ---------------------------

PAUSE_PLACES = ("between", "backward", "save")


def pause_points() -> dict[tuple[str, int], bool]:
    """AGDLM_FAULT_PAUSE_AT=PLACE:N[,PLACE:N...] (PLACE: between = before step N+1 starts,
    backward = inside step N's backward, save = inside the checkpoint write of step N)."""
    points = {}
    for item in filter(None, os.environ.get("AGDLM_FAULT_PAUSE_AT", "").split(",")):
        place, _, step = item.partition(":")
        if place not in PAUSE_PLACES or not step.isdigit():
            raise ValueError(f"AGDLM_FAULT_PAUSE_AT: {item!r} is not PLACE:STEP with PLACE in {PAUSE_PLACES}")
        points[(place, int(step))] = True
    return points


def pausing_rank(rank: int) -> bool:
    """The rank the test hooks act on: rank 1 (rank 0 on one process), as AGDLM_FAULT_AT_STEP."""
    return rank == min(1, int(os.environ.get("WORLD_SIZE", "1")) - 1)


def pause_until_signalled(watch: SignalWatch, place: str, step: int, rank: int) -> None:
    """Test-only hook: at a point AGDLM_FAULT_PAUSE_AT names, the pausing rank appends
    "PLACE:STEP PID" to AGDLM_FAULT_PAUSE_FILE and waits (60 s at most) for one more signal, so
    a test can signal the run (the launcher, or one worker) at a known place."""
    if (place, step) not in pause_points() or not pausing_rank(rank):
        return
    seen = watch.count
    with open(os.environ["AGDLM_FAULT_PAUSE_FILE"], "a") as f:
        f.write(f"{place}:{step} {os.getpid()}\n")
    deadline = time.monotonic() + 60
    while watch.count == seen and time.monotonic() < deadline:
        time.sleep(0.01)  # a signal interrupts the sleep and runs the handler
    if watch.count == seen:
        print(f"AGDLM_FAULT_PAUSE_AT: no signal came at {place}:{step}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def pause_inside_backward(model, watch: SignalWatch, step: int, rank: int):
    """Test-only hook: for a `backward:STEP` pause point, pause when the backward reaches the
    output of the last transformer block (after the head's gradients, before the blocks')."""
    if ("backward", step) not in pause_points() or not pausing_rank(rank):
        yield
        return

    def on_forward(module, args, output):
        output.register_hook(lambda grad: pause_until_signalled(watch, "backward", step, rank))

    handle = model.transformer.h[-1].register_forward_hook(on_forward)
    try:
        yield
    finally:
        handle.remove()


def read_pause_file(path: Path) -> list[tuple[str, int]]:
    """The (PLACE:STEP, pid) lines a test reads back."""
    if not Path(path).is_file():
        return []
    return [(line.split()[0], int(line.split()[1])) for line in Path(path).read_text().splitlines() if line.strip()]
