"""Metrics sinks behind one small interface: `log(record)` and `close()`.

A record is a flat dict with at least "step", "tokens" and "kind" ("train" | "eval").
Only rank 0 builds sinks; other ranks get an empty Metrics that drops everything."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Protocol

import torch


class Sink(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log(self, record: dict) -> None:
        if record["kind"] == "eval":
            line = f"step {record['step']:>6} | val loss {record['val_loss']:.4f} | tokens {record['tokens']:,}"
        else:
            size = (
                f"eta {record['agd_eta']:.4g} G {record['agd_G']:.4g}"
                if "agd_eta" in record
                else f"lr {record.get('lr', float('nan')):.3g}"
            )
            line = (
                f"step {record['step']:>6} | loss {record['train_loss']:.4f} | {size} | "
                f"tokens {record['tokens']:,} | {record['tokens_per_s']:,.0f} tok/s | "
                f"{record['step_time_s'] * 1000:.0f} ms/step"
            )
            if "mfu" in record:
                line += f" | mfu {record['mfu'] * 100:.1f}%"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl, flushed each line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "a", buffering=1)

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.file.close()


class Metrics:
    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_metrics(cfg, run_dir: Path, env, resumed: bool = False) -> Metrics:
    """Rank 0 logs to the console and <run_dir>/metrics.jsonl; other ranks log nothing."""
    if not env.is_main:
        return Metrics()
    return Metrics([ConsoleSink(), JsonlSink(Path(run_dir) / "metrics.jsonl")])


def roll_back_metrics(path: Path, step: int) -> int:
    """On resume from step `step`, move records logged after it (by the interrupted run)
    into metrics.rolled_back.jsonl, so metrics.jsonl continues one curve. Returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, later = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a crash
            later.append(line)
            continue
        (keep if rec_step <= step else later).append(line)
    if later:
        with open(path.with_name("metrics.rolled_back.jsonl"), "a") as f:
            f.write("\n".join(later) + "\n")
        tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(later)


# ---- throughput and memory ------------------------------------------------------------

# Dense bf16 peak FLOP/s by device name fragment (no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops
    return None


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import psutil

        return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover
        return {}
