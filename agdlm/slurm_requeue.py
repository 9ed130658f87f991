"""The lines of a Slurm job script that turn a time limit or a preemption into a checkpoint and
a requeue. `agdlm sweep --emit slurm` writes them; launch/slurm.sbatch holds the same by hand.

    #SBATCH --signal=B:USR1@120   Slurm signals the batch shell 120 s before the time limit
    #SBATCH --requeue             the job may go back to the queue
    #SBATCH --open-mode=append    the next allocation appends to the same log

On that signal, or SIGTERM (what Slurm sends on a preemption), the script sends SIGTERM to
srun, which forwards it to each node's torchrun agent; the agents forward it to the trainers
and wait up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (the lead time less 10) before killing
them. The trainers finish their step, write one checkpoint together and exit 75
(agdlm.preemption). When srun is done, the script runs `scontrol requeue "$SLURM_JOB_ID"` and the
next allocation resumes the run from that checkpoint, in the same W&B run."""

from __future__ import annotations

import re
import signal

from agdlm.config import ConfigError

DEFAULT_SIGNAL = "USR1@120"
SIGNAL_OPTION = re.compile(r"^(?:SIG)?([A-Z][A-Z0-9]*)@([0-9]+)$")
GRACE_SECONDS = 10  # what the requeue needs after the trainers stop


def parse_signal(option: str) -> tuple[str, int]:
    """`USR1@120` (or `SIGUSR1@120`) -> ("USR1", 120): the signal Slurm sends the batch shell,
    and how many seconds before the time limit. ConfigError naming --signal otherwise."""
    match = SIGNAL_OPTION.match(option)
    name = match.group(1) if match else ""
    if not match or not isinstance(getattr(signal, f"SIG{name}", None), signal.Signals) or name in ("KILL", "STOP"):
        raise ConfigError(f"--signal {option!r}: expected SIGNAL@SECONDS with a signal bash can trap, e.g. "
                          f"{DEFAULT_SIGNAL}")
    seconds = int(match.group(2))
    if seconds <= GRACE_SECONDS:
        raise ConfigError(f"--signal {option!r}: {seconds} s before the time limit leaves no time to checkpoint")
    return name, seconds


def sbatch_lines(name: str, seconds: int) -> list[str]:
    return [f"#SBATCH --signal=B:{name}@{seconds}", "#SBATCH --requeue", "#SBATCH --open-mode=append"]


def trap_lines(name: str, seconds: int) -> list[str]:
    """Before the task starts: what to do when the signal comes."""
    names = [name] if name == "TERM" else [name, "TERM"]
    return [
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{seconds - GRACE_SECONDS}}}"
        "  # torchrun waits this long for the checkpoint",
        'stop_signal=""',
        "task_pid=\"\"",
        "stop() {  # the trainers finish their step, checkpoint together and exit 75",
        '  stop_signal=$1',
        '  echo "agdlm: SIG$1: asking the trainers to checkpoint and stop" >&2',
        '  if [[ -n "$task_pid" ]]; then kill -TERM "$task_pid" 2>/dev/null || true; fi',
        "}",
        *[f"trap 'stop {n}' {n}" for n in names],
    ]


def run_lines(command: str = '"${task[@]}"') -> list[str]:
    """Run the task in the background, wait for it through any signal, requeue if one came."""
    return [
        f"{command} &",
        "task_pid=$!",
        'if [[ -n "$stop_signal" ]]; then kill -TERM "$task_pid" 2>/dev/null || true; fi',
        "while true; do  # a trapped signal ends `wait` early: wait again until the task is done",
        '  status=0; wait "$task_pid" || status=$?',
        '  kill -0 "$task_pid" 2>/dev/null || break',
        "done",
        'if [[ -n "$stop_signal" && "$status" -ne 0 ]]; then',
        '  echo "agdlm: requeueing job $SLURM_JOB_ID; the next allocation resumes from the checkpoint" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
