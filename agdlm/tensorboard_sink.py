"""TensorBoard metrics sink (`log.tensorboard: true`): the records of metrics.jsonl as
scalars in <run_dir>/tensorboard/, under the same names, with tokens seen as the x-axis
(`global_step` = tokens, as the W&B sink plots against tokens). Needs the `tensorboard`
package (the `tensorboard` extra); torch.utils.tensorboard writes the event files."""

from __future__ import annotations

import math
from pathlib import Path

from agdlm.config import ConfigError

LOG_DIR = "tensorboard"


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / LOG_DIR))

    def log(self, record: dict) -> None:
        tokens = int(record["tokens"])
        for name, value in record.items():
            if name in ("tokens", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue  # as metrics.jsonl writes null: no point rather than a spike
            self.writer.add_scalar(name, value, global_step=tokens)
        self.writer.flush()  # a crash loses no more than the JSONL file does

    def close(self) -> None:
        self.writer.close()
