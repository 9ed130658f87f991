"""`agdlm <command>`: each command lives in its own module and is imported only when used,
so `agdlm layers` or `agdlm report` never pay for DeepSpeed or W&B imports."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("agdlm.train", "train a GPT from a config (default: the offline demo)"),
    "sample": ("agdlm.sample", "generate text from a run's latest checkpoint"),
    "layers": ("agdlm.optim.layers_cli", "print the AGD layer table of a config's model"),
    "prepare": ("agdlm.data.prepare", "tokenise a corpus into uint16 train_*/val_* shards"),
    "sweep": ("agdlm.sweep", "expand a sweep file into runs; run them or print launch commands"),
    "report": ("agdlm.report.cli", "compare runs: plots and a markdown table from their logs"),
    "export": ("agdlm.export", "write a single-file model from any backend's checkpoint"),
    "eval": ("agdlm.evaluate", "val loss/perplexity on any data source; HellaSwag-format multiple choice"),
    "bench": ("agdlm.bench.cli", "benchmarks that print figures: optim, data, dist, memory"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: agdlm <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`agdlm <command> --help` for a command's arguments; `agdlm` alone runs `agdlm train`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    module = importlib.import_module(COMMANDS[command][0])
    try:
        code = int(module.main(argv) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`agdlm sweep --list | grep -q todo`, `| head`): that is not an
        # error of ours, so no traceback; stdout goes to devnull so the exit flush cannot raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
