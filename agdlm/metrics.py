"""Metrics sinks behind one small interface: `log(record)` and `close()`.

A record is a flat dict with at least "step", "tokens" and "kind": "train", "eval", or
"preempt" (a checkpoint written for a signal: "signal", "checkpoint", "signal_to_checkpoint_s").
Only rank 0 builds sinks; other ranks get an empty Metrics that drops everything."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Protocol

import torch

from agdlm.atomic_files import atomic_write_text, reporting_full_disk


class MetricsFileError(ValueError):
    """metrics.jsonl holds a line a resume cannot place on the curve (not UTF-8, or JSON
    that is not a record); refused rather than guessed at, so no record is lost."""


class Sink(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log(self, record: dict) -> None:
        if record["kind"] == "eval":
            line = f"step {record['step']:>6} | val loss {record['val_loss']:.4f} | tokens {record['tokens']:,}"
        elif record["kind"] == "preempt":
            line = (f"step {record['step']:>6} | preempted by {record['signal']} | checkpoint "
                    f"{record['checkpoint'] or 'none'} {record['signal_to_checkpoint_s']:.1f} s after the signal")
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
        with reporting_full_disk(self.path):
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


class WandbSink:
    """Weights & Biases: one W&B run per run directory, files under <run_dir>/wandb/.

    The W&B config is the full resolved config plus the run's provenance.json; the job type
    is the optimiser and the group is log.group (the sweep or comparison). Every record is
    logged under the same names as in metrics.jsonl, against tokens seen as the x-axis.
    The run id lives in <run_dir>/wandb_id: a run resumed from a checkpoint continues the
    same W&B run (resume="allow"); a run that starts from step 0 gets a fresh id.
    `mode` "online" without credentials falls back to "offline" with a warning."""

    def __init__(self, cfg, run_dir: Path, resumed: bool = False, mode: str | None = None):
        import wandb

        self.run_dir = Path(run_dir)
        mode = resolve_wandb_mode(mode or cfg.log.wandb)
        id_file = self.run_dir / "wandb_id"
        if resumed and id_file.is_file() and id_file.read_text().strip():
            run_id = id_file.read_text().strip()
        else:
            run_id = new_wandb_id()
            id_file.write_text(run_id + "\n")
        config = cfg.to_dict()
        prov_file = self.run_dir / "provenance.json"
        if prov_file.is_file():
            config["provenance"] = json.loads(prov_file.read_text())
        self.run = wandb.init(
            mode=mode,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            name=cfg.train.run_name,
            project=cfg.log.project,
            entity=cfg.log.entity,
            group=cfg.log.group,
            job_type=cfg.optim.name,
            tags=list(cfg.log.tags) or None,
            config=config,
            settings=wandb.Settings(console="off"),
        )
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="tokens")
        self.run.define_metric("val_loss", step_metric="tokens", summary="min,last")

    def log(self, record: dict) -> None:
        data = {
            k: v for k, v in record.items()
            if k != "kind" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        self.run.log(data)
        if record["kind"] == "preempt":  # W&B shows the run as preempted, to be resumed, not as failed
            self.run.mark_preempting()

    def close(self) -> None:
        self.run.finish()


def new_wandb_id() -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_credentials_present() -> bool:
    """An API key in the environment, an identity token file, or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode == "online" and not wandb_credentials_present():
        print("agdlm: log.wandb=online but no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline. "
              "Upload later with `wandb sync <run_dir>/wandb/offline-run-*`.", file=sys.stderr, flush=True)
        return "offline"
    return mode


def build_metrics(cfg, run_dir: Path, env, resumed: bool = False) -> Metrics:
    """Rank 0 logs to the console, <run_dir>/metrics.jsonl, (log.wandb != off) W&B and
    (log.tensorboard) TensorBoard; other ranks log nothing."""
    if not env.is_main:
        return Metrics()
    sinks: list[Sink] = [ConsoleSink(), JsonlSink(Path(run_dir) / "metrics.jsonl")]
    if cfg.log.wandb != "off":
        sinks.append(WandbSink(cfg, run_dir, resumed=resumed))
    if getattr(cfg.log, "tensorboard", False):
        from agdlm.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir))
    return Metrics(sinks)


def roll_back_metrics(path: Path, step: int) -> int:
    """On resume from step `step`, move records logged after it (by the interrupted run)
    into metrics.rolled_back.jsonl, so metrics.jsonl continues one curve. Returns how many.
    Raises MetricsFileError (before changing anything) for a line it cannot place."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, later = [], []
    for line, record in metrics_lines(path):
        if record is None:  # a line cut by a crash
            later.append(line)
            continue
        (keep if record.get("step", 0) <= step else later).append(line)
    if later:
        aside = path.with_name("metrics.rolled_back.jsonl")
        with reporting_full_disk(aside), open(aside, "a") as f:
            f.write("\n".join(later) + "\n")
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(later)


def metrics_lines(path: Path) -> list[tuple[str, dict | None]]:
    """Every non-blank line of a metrics.jsonl with its record (None for a line cut short by a
    crash: not valid JSON). MetricsFileError for a line that is not UTF-8 or not a record."""
    lines = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MetricsFileError(f"{path} line {number} is not UTF-8 text; "
                                   "move it (or the file) aside to resume") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            lines.append((line, None))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
            raise MetricsFileError(f"{path} line {number} is not a metrics record (a JSON object with a numeric "
                                   f"\"step\"): {line[:60]!r}; move it (or the file) aside to resume")
        lines.append((line, record))
    return lines


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
