"""`train.profile: {start: N, steps: K}`: a torch profiler trace of optimiser steps N+1 ..
N+K on rank 0, written to <run_dir>/profile/ as `rank0.steps_<a>-<b>.pt.trace.json` (Chrome
trace format: chrome://tracing or ui.perfetto.dev; the name is the one TensorBoard's
profiler plugin looks for). On CUDA also a memory snapshot (`memory_snapshot.pickle`, for
pytorch.org/memory_viz). The trainer names each optimiser step (`AGD.step`, `AdamW.step`)
with record_function, so it stands out in the trace."""

from __future__ import annotations

from pathlib import Path

import torch

PROFILE_DIR = "profile"
MEMORY_HISTORY_ENTRIES = 100_000


class StepProfiler:
    def __init__(self, spec: dict | None, run_dir: Path, is_main: bool, device: torch.device):
        self.enabled = spec is not None and is_main
        self.start, self.steps = (spec["start"], spec["steps"]) if spec else (0, 0)
        self.out = Path(run_dir) / PROFILE_DIR
        self.cuda = device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None
        self.first_step = 0

    def before_step(self, step: int) -> None:
        """Called with the number of steps done; starts recording at step `start`."""
        if not self.enabled or self.profiler is not None or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()
        self.first_step = step + 1

    def after_step(self, step: int) -> None:
        if self.profiler is not None and step >= self.start + self.steps:
            self.stop(step)

    def stop(self, last_step: int) -> None:
        """Write the trace of the steps recorded so far (also when the run ends early)."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.out / f"rank0.steps_{self.first_step}-{last_step}.pt.trace.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler = None
