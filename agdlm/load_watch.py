"""Was the machine otherwise idle while a run trained? Speed figures (tokens/s, seconds per
token) are comparable only between runs made one at a time on an idle machine: a second
heavy job on 2 cores slows each 2-4x. LoadWatch samples the 1-minute load average while the
run goes, and calls the run idle when it never exceeded what the run alone puts there (its
torch threads, at most the cores) plus a margin. A run paused (SIGSTOP) for other work shows
that work's load, so it is marked too."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

SAMPLE_S = 10.0
MARGIN = 0.75  # the loader thread, the OS, a shell: below one more busy core


class LoadWatch:
    def __init__(self, own_load: float | None = None, sample_s: float = SAMPLE_S):
        cores = os.cpu_count() or 1
        self.own_load = float(min(cores, int(os.environ.get("OMP_NUM_THREADS", cores)))) if own_load is None else own_load
        self.sample_s = sample_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.sample_s):
                return

    def __enter__(self) -> "LoadWatch":
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def threshold(self) -> float:
        return self.own_load + MARGIN

    @property
    def idle(self) -> bool:
        # the first samples still carry the minute before the run: judged with the rest
        return max(self.samples, default=0.0) <= self.threshold

    def record(self) -> dict:
        peak = max(self.samples, default=0.0)
        note = ("machine otherwise idle" if self.idle else
                f"not idle: 1-min load average reached {peak:.2f} (> {self.threshold:.2f} for this run alone)")
        return {"idle": self.idle, "max_loadavg_1min": round(peak, 2), "threshold": self.threshold,
                "samples": len(self.samples), "note": note}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.record(), indent=1) + "\n")
