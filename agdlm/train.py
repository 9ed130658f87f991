"""The training loop: config -> data -> model -> backend -> optimiser -> steps, evals,
checkpoints and metrics. `agdlm train [CONFIG ...] [section.key=value ...]`.

A run lives in <train.out_dir>/<train.run_name>/. Launching the same run again resumes
from its latest checkpoint (the same loss curve, step for step); without a `latest` pointer,
or when that checkpoint does not load or does not match its manifest, from the newest one
that does (a bad one is renamed corrupt_step_N, never deleted). A run that has its DONE marker
is trained again only to a larger train.max_steps. A run stopped for a non-finite loss or AGD's
skip limit gets a DIVERGED marker (the reason, one line): a result, which a sweep does not rerun;
launching it again by hand removes it and resumes. Nothing in the run folder is written until
the launch is known good.

Checkpoints come every train.ckpt_interval steps, every train.ckpt_every_minutes if set, at
the end, and on a preemption signal (agdlm.preemption): then at the end of the step in
flight, after which the run exits 75. Whatever only one rank can see (a signal, its clock, its
data reader stopping, AGD's skip limit) is voted on in the step's one collective
(agdlm.rank_votes), so every rank acts at the same step with the same line."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from agdlm.atomic_files import (DiskFullError, atomic_torch_save, atomic_write_text, read_json, reporting_full_disk,
                                write_json)
from agdlm.checkpoint import (begin_checkpoint, checkpoint_problem, checkpoints_dir, commit_checkpoint, first_line,
                              latest_checkpoint, point_latest_at, resume_candidates, set_aside, step_dir_name)
from agdlm.config import (Config, ConfigError, build_config, config_to_yaml, load_config, read_yaml_mapping,
                          section_help, split_config_items)
from agdlm.data import DataSourceError, build_data, encoding_for, merge_states
from agdlm.manifest import MANIFEST, checkpoint_files, describe, manifest_text, shares
from agdlm.metrics import MetricsFileError, build_metrics, memory_stats, metrics_lines, peak_flops, roll_back_metrics
from agdlm.model import GPT
from agdlm.optim.registry import kind_of
from agdlm.parallel import CHECKPOINT_LAYOUT, build_backend, init_distributed, shutdown_distributed
from agdlm.parallel.bindings import BindingInternalsMissing
from agdlm.parallel.env import exit_without_teardown, launched_as_worker
from agdlm.preemption import (PREEMPTED_EXIT_CODE, Preempted, SignalWatch, pause_inside_backward,
                              pause_until_signalled)
from agdlm.profiling import StepProfiler
from agdlm.rank_votes import lowest_rank_reason, max_over_ranks, reduce_loss_and_votes, several_ranks
from agdlm import provenance

# What must not change on resume (whole sections or single keys): otherwise the checkpoint is of a
# different experiment. Other train.* and log.* keys may change (e.g. a longer max_steps for AGD);
# parallel.* may change while the checkpoint layout stays the same.
RESUME_MUST_MATCH = ("model", "optim", "data", "train.global_batch_size")
RESUME_MAY_CHANGE = ("optim.compile",)  # how the step runs, not what it computes


DIVERGED = "DIVERGED"  # a run folder's marker: stopped for a non-finite loss or AGD's skip limit


class TrainingDiverged(RuntimeError):
    pass


class ResumeRefused(RuntimeError):
    """The run folder's checkpoints cannot be resumed by this launch; nothing was written."""


def metrics_lines_readable(path: Path) -> None:
    """Raise MetricsFileError now for a metrics.jsonl the resume could not roll back."""
    if path.is_file():
        metrics_lines(path)


def describe_load_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2])[:300] or type(error).__name__


def make_optimizer_factory(cfg: Config, device_type: str):
    def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return kind_of(cfg.optim.name).build(model, cfg.optim, device_type)

    return make_optimizer


def build_model_and_backend(cfg: Config, env, fresh: bool, initial_weights=None):
    """The backend holding the model and its optimiser. A backend that can build the model
    sharded (`setup_sharded`: FSDP2, ZeRO-3) gives each rank only its shard, initialised to the
    weights one process would have (agdlm.parallel.sharded_init); otherwise the whole model is
    built here and, on a fresh run, initialised by `initial_weights` (default: the optimiser's init)."""
    backend = build_backend(cfg, env)
    make_optimizer = make_optimizer_factory(cfg, env.device.type)
    if getattr(backend, "builds_sharded", lambda: False)():
        backend.setup_sharded(make_optimizer, fresh=fresh)
        return backend
    model = GPT(cfg.model)
    if fresh:
        (initial_weights or default_initial_weights(cfg))(model)
    backend.setup(model, make_optimizer)
    return backend


def default_initial_weights(cfg: Config):
    def initialise(model: torch.nn.Module) -> None:
        kind_of(cfg.optim.name).init_weights(model, cfg.optim)

    return initialise


def saved_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    return build_config(read_yaml_mapping(path)) if path.is_file() else None


def changed_keys(saved_cfg: Config, cfg: Config) -> list[str]:
    """Every `section.key: old -> new` between a run's config.yaml and this launch."""
    saved, now = saved_cfg.to_dict(), cfg.to_dict()
    return [f"{section}.{k}: {saved[section].get(k)!r} -> {v!r}"
            for section in now for k, v in now[section].items() if saved.get(section, {}).get(k) != v]


def check_resume_compatible(cfg: Config, run_dir: Path) -> None:
    saved_cfg = saved_config(run_dir)
    if saved_cfg is None:
        return
    saved, now = saved_cfg.to_dict(), cfg.to_dict()
    diffs = []
    for item in RESUME_MUST_MATCH:
        section, _, key = item.partition(".")
        for k in [key] if key else now[section]:
            if saved[section][k] != now[section][k] and f"{section}.{k}" not in RESUME_MAY_CHANGE:
                diffs.append(f"{section}.{k}: {saved[section][k]!r} -> {now[section][k]!r}")
    diffs += kind_of(cfg.optim.name).resume_problems(saved_cfg, cfg)
    if CHECKPOINT_LAYOUT[saved_cfg.parallel.backend] != CHECKPOINT_LAYOUT[cfg.parallel.backend]:
        diffs.append(f"parallel.backend: {saved_cfg.parallel.backend} -> {cfg.parallel.backend} "
                     "(a different checkpoint layout; `agdlm export` gives a single-file model)")
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different experiment ({'; '.join(diffs)}); "
            "use another train.run_name or train.out_dir"
        )


def cpp_compilers() -> list[str]:
    """The C++ compilers torch.compile's CPU backend (inductor) would look for: $CXX, g++, clang++."""
    return [c for c in (os.environ.get("CXX"), "g++", "clang++") if c]


def has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in cpp_compilers())


def check_compile_toolchain(cfg: Config, device: torch.device) -> None:
    """torch.compile on the CPU builds C++ (inductor): a missing compiler is one config line
    before the run starts, not a traceback at its first forward or step."""
    wanted = [key for key, on in (("train.compile", cfg.train.compile),
                                  ("optim.compile", cfg.optim.compile and kind_of(cfg.optim.name).compiles_step))
              if on]
    if wanted and device.type == "cpu" and not has_cpp_compiler():
        raise ConfigError(f"{' and '.join(wanted)}=true on the CPU: torch.compile builds C++ there and no compiler "
                          f"was found ({', '.join(cpp_compilers())}); install one or set it false")


class Trainer:
    def __init__(self, cfg: Config, env, command_line: list[str] | None = None):
        self.cfg, self.env = cfg, env
        self.command_line = command_line
        self.run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
        self.total_steps = cfg.total_steps()
        self.accum_steps = cfg.grad_accum_steps(env.world_size)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.block_size
        self.kind = kind_of(cfg.optim.name)
        self.step = 0
        self.signals = SignalWatch()  # installed for the training loop only (run)
        self.decided: dict[str, bool] = {}  # the last step's agreed votes (agdlm.rank_votes)
        self._last_checkpoint_at = time.monotonic()

    # ---- setup -----------------------------------------------------------------------
    def setup(self) -> None:
        """Check, build and load everything before writing anything: a launch that fails
        (wrong model, bad data, no loadable checkpoint) leaves the run folder as it was."""
        cfg, env = self.cfg, self.env
        check_compile_toolchain(cfg, env.device)
        n_vocab = encoding_for(cfg.data.tokenizer).n_vocab
        if cfg.model.vocab_size < n_vocab:  # every data path yields ids of data.tokenizer
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than data.tokenizer="
                              f"{cfg.data.tokenizer}'s {n_vocab} tokens")
        candidates, pointer_warning = resume_candidates(self.run_dir)
        if candidates:
            check_resume_compatible(cfg, self.run_dir)
        metrics_lines_readable(self.run_dir / "metrics.jsonl")  # every rank: fails alike, before any collective

        torch.manual_seed(cfg.train.seed + env.rank)  # dropout differs per rank; data does not
        self.data = self._build_data()
        self.backend = build_model_and_backend(cfg, env, fresh=not candidates, initial_weights=self._initial_weights)
        self.peak_flops = peak_flops(env.device)

        resume_from, bad = self._load_newest_good_checkpoint(candidates) if candidates else (None, [])
        env.barrier()  # every rank has read the old config.yaml and checkpoint before rank 0 changes them
        if env.is_main:
            self._record_start(resume_from, bad, pointer_warning)
        env.barrier()
        self.metrics = build_metrics(cfg, self.run_dir, env, resumed=resume_from is not None)

    def _initial_weights(self, model: GPT) -> None:
        """A fresh run: the optimiser's init (AGD's, part of the algorithm) unless optim.init=keep,
        then the weights of model.init_from (config validation ties the two together)."""
        cfg = self.cfg
        self.kind.init_weights(model, cfg.optim)
        if cfg.model.init_from:
            from agdlm.init_from import init_model

            for warning in init_model(model, cfg.model.init_from, cfg.data.tokenizer):
                if self.env.is_main:
                    print(f"agdlm: warning: {warning}", file=sys.stderr, flush=True)

    def _build_data(self):
        cfg, env = self.cfg, self.env
        try:
            return build_data(cfg, rank=env.rank, world_size=env.world_size, barrier=env.barrier)
        except ValueError as e:  # e.g. fewer tokens than one block
            raise ConfigError(f"model.block_size={cfg.model.block_size} with data.source={cfg.data.source!r}: "
                              f"{first_line(e)}") from None

    def _load_newest_good_checkpoint(self, candidates: list[Path]) -> tuple[Path, list[tuple[Path, str]]]:
        """Load the newest candidate whose files are all present and load on every rank;
        return it and the (folder, problem) of each newer one skipped."""
        layout = CHECKPOINT_LAYOUT[self.cfg.parallel.backend]
        bad: list[tuple[Path, str]] = []
        for folder in candidates:
            problem = checkpoint_problem(folder, layout, self.env.rank, self.env.world_size)
            problem = self._first_problem_on_any_rank(problem)
            if problem is None:
                self._load_on_every_rank(folder)
                return folder, bad
            bad.append((folder, problem))
        problems = "; ".join(problem for _, problem in bad)
        raise ResumeRefused(f"no checkpoint in {checkpoints_dir(self.run_dir)} loads ({problems}); nothing was changed."
                            " Move the checkpoints folder aside to start the run over")

    def _first_problem_on_any_rank(self, problem: str | None) -> str | None:
        """All ranks agree on a checkpoint: one rank's problem is every rank's."""
        return lowest_rank_reason(problem, self.env)

    def _load_on_every_rank(self, folder: Path) -> None:
        """A load that fails on one rank (a DeepSpeed rank reads its own files) stops every
        rank, with that rank's line."""
        failure = None
        try:
            self._load_checkpoint(folder)
        except (ResumeRefused, ConfigError) as e:
            failure = (type(e).__name__, str(e))
        failure = lowest_rank_reason(failure, self.env)
        if failure:
            raise (ConfigError if failure[0] == "ConfigError" else ResumeRefused)(failure[1])

    def _record_start(self, resume_from: Path | None, bad: list[tuple[Path, str]], pointer_warning: str | None) -> None:
        """Rank 0, once the run is known good: set bad checkpoints aside, then write
        config.yaml and provenance and put metrics.jsonl back on the resumed curve."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if pointer_warning and resume_from is not None:
            print(f"agdlm: warning: {pointer_warning}; resuming from {resume_from.name}", file=sys.stderr, flush=True)
        for folder, problem in bad:
            aside = set_aside(folder)
            print(f"agdlm: warning: checkpoint {folder.name} is unusable ({problem}); kept as {aside.name}, "
                  f"resuming from {resume_from.name}", file=sys.stderr, flush=True)
        if resume_from is not None and (pointer_warning or bad):
            point_latest_at(resume_from)
        atomic_write_text(self.run_dir / "config.yaml", config_to_yaml(self.cfg))
        self._write_provenance(resumed_from=resume_from)
        (self.run_dir / "DONE").unlink(missing_ok=True)  # a finished run being extended
        (self.run_dir / DIVERGED).unlink(missing_ok=True)  # a diverged run tried again
        if resume_from is None:  # a restart before the first checkpoint starts the curve anew
            roll_back_metrics(self.run_dir / "metrics.jsonl", step=-1)
            return
        dropped = roll_back_metrics(self.run_dir / "metrics.jsonl", self.step)
        print(f"resumed {self.run_dir} from {resume_from.name} (step {self.step}); "
              f"{dropped} metric records after it moved to metrics.rolled_back.jsonl", flush=True)

    def _write_provenance(self, resumed_from: Path | None) -> None:
        path = self.run_dir / "provenance.json"
        record = provenance.collect(
            world_size=self.env.world_size,
            seeds={"train.seed": self.cfg.train.seed, "data.seed": self.cfg.data.seed},
            command_line=self.command_line,
            device=str(self.env.device),
        )
        if resumed_from is not None and path.is_file():
            previous = read_json(path)
            previous.setdefault("resumes", []).append({**record, "from_checkpoint": resumed_from.name})
            record = previous
        write_json(path, record)

    # ---- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, at_end: bool = False) -> Path | None:
        """checkpoints/step_N: every rank writes its files, then the manifest (agdlm.manifest),
        then rank 0 commits. Returns the folder; None when AGD is skipping steps (the last
        checkpoint before the streak stays the newest)."""
        env = self.env
        if self.stop_if_skipping() and not at_end:
            return None
        if env.is_main:
            begin_checkpoint(self.run_dir, self.step)
        env.barrier()
        folder = checkpoints_dir(self.run_dir) / f".tmp_step_{self.step}"

        def write_files(folder: Path) -> None:  # model.pt holds the weights the optimiser means for
            with self.kind.evaluation_weights(self.backend.optimizer):  # evaluation (schedule-free's average)
                self._write_checkpoint_files(folder)

        self._write_on_every_rank(folder, write_files)
        pause_until_signalled(self.signals, "save", self.step, env.rank)  # test-only hook
        self._write_on_every_rank(folder, self._write_manifest)
        if env.is_main:
            commit_checkpoint(self.run_dir, self.step, self.cfg.train.keep_checkpoints)
        env.barrier()
        self._last_checkpoint_at = time.monotonic()
        return checkpoints_dir(self.run_dir) / step_dir_name(self.step)

    def _write_on_every_rank(self, folder: Path, write) -> None:
        """Run `write(folder)` on every rank; if it fails on any, remove the folder and raise on all."""
        failure = None
        try:
            with reporting_full_disk(folder):
                write(folder)
        except (OSError, RuntimeError) as e:  # kept to raise once every rank knows
            failure = e
        if self._any_rank_failed(failure is not None):
            if self.env.is_main:  # free what the failed write took; `latest` still names the previous one
                shutil.rmtree(folder, ignore_errors=True)
            raise failure or RuntimeError(f"another rank failed while writing {folder}")

    def _write_manifest(self, folder: Path) -> None:
        """Each rank checksums its share of the folder's files (about 1/world of the bytes);
        rank 0 writes manifest.json from all of them, last. A rank that cannot read a file
        still takes part in the exchange, then raises."""
        env = self.env
        listing = [checkpoint_files(folder) if env.is_main else None]  # rank 0's view of the shared folder
        if several_ranks(env):
            dist.broadcast_object_list(listing, src=0)
        entries, failure = {}, None
        try:
            entries = describe(folder, shares(listing[0], env.world_size)[env.rank])
        except OSError as e:
            failure = e
        everyone = [entries]
        if several_ranks(env):
            everyone = [None] * env.world_size
            dist.all_gather_object(everyone, entries)
        if failure:
            raise failure
        if env.is_main:
            atomic_write_text(folder / MANIFEST, manifest_text({k: v for part in everyone for k, v in part.items()}))

    def _write_checkpoint_files(self, folder: Path) -> None:
        env = self.env
        self.backend.save(folder)
        rng = {"cpu": torch.get_rng_state()}
        if env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(env.device)
        atomic_torch_save(rng, folder / f"rng_rank{env.rank}.pt")
        data_states = [self.data.train.state_dict()]
        if env.distributed and env.world_size > 1:  # streaming positions differ per rank
            data_states = [None] * env.world_size
            dist.all_gather_object(data_states, self.data.train.state_dict())
        if env.is_main:
            write_json(folder / "data.json", merge_states(data_states))
            write_json(  # "manifest": a resume then knows a missing manifest.json was lost, not never written
                folder / "trainer.json",
                {"step": self.step, "tokens": self.step * self.tokens_per_step, "world_size": env.world_size,
                 "manifest": True},
            )

    def _any_rank_failed(self, failed: bool) -> bool:
        if not (self.env.distributed and self.env.world_size > 1):
            return failed
        flag = torch.tensor([int(failed)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _load_checkpoint(self, folder: Path) -> None:
        env = self.env
        state = read_json(folder / "trainer.json")
        self.step = int(state["step"])
        try:
            self.backend.load(folder)
        except Exception as e:  # noqa: BLE001 - its files passed the check: they do not fit, or were refused
            raise ResumeRefused(f"{folder} does not fit this model and optimiser, or was refused "
                              f"({describe_load_error(e)}); relaunch with the run's own config (config.yaml)") from None
        self.kind.after_load(self.backend.optimizer)
        try:
            self.data.train.load_state_dict(read_json(folder / "data.json"))
        except ValueError as e:  # e.g. a streaming position on another world size
            raise ConfigError(f"{folder}: {e}") from None
        rng_file = folder / f"rng_rank{env.rank}.pt"
        if state["world_size"] == env.world_size and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], env.device)

    # ---- eval ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        model = self.backend.model
        model.eval()
        total, count = torch.zeros((), device=self.env.device), 0
        with self.kind.evaluation_weights(self.backend.optimizer):
            for k in range(self.cfg.train.eval_batches):
                for x, y in self.data.val.batch(k):
                    with self.backend.autocast():
                        _, loss = model(x.to(self.env.device), y.to(self.env.device))
                    total += loss.float()
                    count += 1
        model.train()
        return self.backend.all_reduce_mean(total / count).item()

    def log_eval(self) -> float:
        val_loss = self.evaluate()
        self.metrics.log({"step": self.step, "tokens": self.step * self.tokens_per_step, "kind": "eval", "val_loss": val_loss})
        return val_loss

    # ---- the loop --------------------------------------------------------------------
    def train_step(self, logged: bool = False) -> tuple[torch.Tensor, dict]:
        cfg, backend, dev = self.cfg, self.backend, self.env.device
        self.kind.set_lr(backend.optimizer, self.step, cfg.optim, self.total_steps)
        micro_batches, data_stop = self._next_batch()
        loss_sum = torch.zeros((), device=dev)
        with pause_inside_backward(backend.raw_model, self.signals, self.step + 1, self.env.rank):  # test-only hook
            for i, (x, y) in enumerate(micro_batches):
                loss_sum += backend.forward_backward(
                    x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), self.accum_steps,
                    i == len(micro_batches) - 1).float()
        # One collective and one host sync per optimiser step: the loss, and every rank's votes
        # on what all ranks decide together (agdlm.rank_votes). A non-finite loss must stop the
        # run before the update, so no checkpoint ever holds weights that came from it.
        loss, loss_value, self.decided = reduce_loss_and_votes(loss_sum / len(micro_batches),
                                                               self._votes(data_stop), self.env)
        if self.decided["data_stopped"]:
            raise self._agreed_data_stop(data_stop)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"train loss is {loss_value} at step {self.step + 1}; stopping. {self._last_good()}")
        if self.decided["too_many_skips"]:
            raise TrainingDiverged(lowest_rank_reason(self._too_many_skips(self._local_skips()), self.env))
        _maybe_poison_gradient(self.step, self.env.rank, backend.raw_model)
        if logged:
            self.kind.prepare_log_step(backend.optimizer)
        with torch.profiler.record_function(self.kind.step_name):  # named in profiler traces
            stats = backend.optimizer_step(self.kind.grad_clip(cfg.optim))
        return loss, stats

    def _next_batch(self) -> tuple[list, Exception | None]:
        """This rank's micro-batches; or, when its reader stopped (data.max_bad_fraction, no
        document left for it) while other ranks go on, zeros in their place and the error: they
        keep this rank in the step's collectives until the vote stops every rank before the
        update, so nothing is learnt from them."""
        try:
            return self.data.train.next_batch(), None
        except (DataSourceError, ConfigError) as e:
            if not several_ranks(self.env):
                raise
            rows, columns = self.cfg.train.micro_batch_size, self.cfg.model.block_size
            zeros = torch.zeros(rows, columns, dtype=torch.long)
            return [(zeros, zeros)] * self.accum_steps, e

    def _agreed_data_stop(self, data_stop: Exception | None) -> Exception:
        """The lowest stopped rank's error, for every rank to raise."""
        mine = None if data_stop is None else (type(data_stop).__name__, str(data_stop), self.env.rank)
        kind, text, rank = lowest_rank_reason(mine, self.env)
        error = ConfigError if kind == "ConfigError" else DataSourceError
        return error(f"{text} (rank {rank} of {self.env.world_size}; every rank stops)")

    def _votes(self, data_stop: Exception | None) -> dict:
        """This rank's votes for the step's collective (read as: does any rank say so?)."""
        skips = self.kind.consecutive_skips(self.backend.optimizer)  # up to the previous step; None: never skips
        return {
            "data_stopped": data_stop is not None,
            "too_many_skips": False if skips is None else skips >= self.cfg.train.max_skipped_steps,
            "preempt": self.signals.requested,
            "checkpoint_due": self._checkpoint_due_by_time(),
        }

    def _checkpoint_due_by_time(self) -> bool:
        minutes = self.cfg.train.ckpt_every_minutes
        return minutes is not None and time.monotonic() - self._last_checkpoint_at >= 60 * minutes

    def _local_skips(self) -> int:
        skips = self.kind.consecutive_skips(self.backend.optimizer)
        return 0 if skips is None else int(skips.item())

    def stop_if_skipping(self) -> int:
        """Before a checkpoint or DONE: stop if too many steps in a row were skipped; return
        how many were (0 for a good last step, or an optimiser that never skips). The count is
        the largest on any rank, so every rank saves, or stops, alike."""
        if self.kind.consecutive_skips(self.backend.optimizer) is None:
            return 0
        count = max_over_ranks(self._local_skips(), self.env)
        reason = self._too_many_skips(count)
        if reason:
            raise TrainingDiverged(reason)
        return count

    def _too_many_skips(self, skips: int) -> str | None:
        limit = self.cfg.train.max_skipped_steps
        if skips < limit:
            return None
        return (f"AGD skipped {skips} steps in a row up to step {self.step} (a non-finite gradient made G not finite; "
                f"train.max_skipped_steps={limit}); stopping. {self._last_good()}")

    def _last_good(self) -> str:
        latest = latest_checkpoint(self.run_dir)
        return f"Last good checkpoint: {latest if latest else 'none written yet'}"

    def train_record(self, loss: torch.Tensor, stats: dict, interval_time: float, interval_steps: int) -> dict:
        step_time = interval_time / max(1, interval_steps)
        tokens_per_s = self.tokens_per_step / step_time if step_time > 0 else float("nan")
        record = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "kind": "train",
            "train_loss": loss.item(),
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
        }
        record.update(self.kind.log_metrics(self.backend.optimizer))
        if "grad_norm" in stats:
            record["grad_norm"] = float(stats["grad_norm"])
        if self.peak_flops:
            record["mfu"] = self.backend.flops_per_token() * tokens_per_s / (self.peak_flops * self.env.world_size)
        record.update(memory_stats(self.env.device))
        record.update(self.data.bad_counts())  # data_bad_records, data_bad_members
        return record

    def _extends_finished_run(self) -> bool:
        """A finished run continues only when this launch asks for more steps (and may:
        check_resume_compatible refuses a different experiment, or AdamW's changed horizon);
        otherwise say so, naming any keys that differ from the run's config.yaml."""
        saved_cfg = saved_config(self.run_dir)
        if saved_cfg is None:
            finished_at, diffs = None, []
        else:
            check_resume_compatible(self.cfg, self.run_dir)
            finished_at, diffs = saved_cfg.total_steps(), changed_keys(saved_cfg, self.cfg)
        wanted = self.total_steps
        if finished_at is not None and wanted > finished_at:
            if self.env.is_main:
                print(f"{self.run_dir} finished at step {finished_at} (DONE); continuing to step {wanted}", flush=True)
            return True
        if self.env.is_main:
            changed = f" This launch differs from its config.yaml in {'; '.join(diffs)}." if diffs else ""
            at = f" at step {finished_at}" if finished_at is not None else ""
            print(f"{self.run_dir} is finished (DONE{at}); nothing to do.{changed} To train it further, "
                  "relaunch with a larger train.max_steps (AGD; AdamW's schedule needs optim.lr_decay_steps set "
                  "from the start), "
                  "or use another train.run_name.", flush=True)
        return False

    def run(self) -> dict:
        cfg = self.cfg
        if (self.run_dir / "DONE").is_file() and not self._extends_finished_run():
            return {"finished_before": True, "run_dir": str(self.run_dir)}
        self.setup()
        last_val = None
        profiler = StepProfiler(cfg.train.profile, self.run_dir, self.env.is_main, self.env.device)
        try:
            with SignalWatch(cfg.train.preempt_signals) as self.signals:  # a signal now: checkpoint, exit 75
                if self.step == 0:
                    last_val = self.log_eval()
                last_val = self._train_to_the_end(profiler, last_val)
                self.stop_if_skipping()
                if self.env.is_main:
                    atomic_write_text(self.run_dir / "DONE", f"step {self.step}\n")
        except TrainingDiverged as e:
            if self.env.is_main:  # every rank raises alike; the marker says the run ended, and why
                atomic_write_text(self.run_dir / DIVERGED, f"{e}\n")
            raise
        finally:
            profiler.stop(self.step)
            if hasattr(self, "metrics"):
                self.metrics.close()
        return {"run_dir": str(self.run_dir), "step": self.step, "val_loss": last_val}

    def _train_to_the_end(self, profiler: StepProfiler, last_val: float | None) -> float | None:
        cfg = self.cfg
        skipped, train_time, steps_in_interval = 0, 0.0, 0
        self._last_checkpoint_at = time.monotonic()
        while self.step < self.total_steps:
            _maybe_inject_fault(self.step, self.env.rank)
            pause_until_signalled(self.signals, "between", self.step, self.env.rank)  # test-only hook
            profiler.before_step(self.step)
            t0 = time.perf_counter()  # eval and checkpoint time stay out of step_time_s
            logged = (self.step + 1) % cfg.log.interval == 0 or self.step + 1 == self.total_steps
            loss, stats = self.train_step(logged)
            train_time += time.perf_counter() - t0
            self.step += 1
            profiler.after_step(self.step)
            steps_in_interval += 1
            skipped += int(bool(stats.get("skipped_step", False)))
            at_end = self.step == self.total_steps
            if logged:
                record = self.train_record(loss, stats, train_time, steps_in_interval)
                if skipped:
                    record["skipped_steps"] = skipped
                self.metrics.log(record)
                train_time, steps_in_interval = 0.0, 0
            if self.step % cfg.train.eval_interval == 0 or at_end:
                last_val = self.log_eval()
            preempted = self.decided.get("preempt", False) and not at_end  # at the end: just finish
            saved = None
            if self.step % cfg.train.ckpt_interval == 0 or at_end or self.decided.get("checkpoint_due") or preempted:
                saved = self.save_checkpoint(at_end)
            if preempted:
                self._stop_for_preemption(saved)
        return last_val

    def _stop_for_preemption(self, saved: Path | None) -> None:
        """Mark the checkpoint in the metrics and raise Preempted, with the same line on every
        rank: the lowest rank that saw the signal names it and the seconds since."""
        watch = self.signals
        mine = (watch.first, time.monotonic() - watch.received_at) if watch.requested else None
        name, seconds = lowest_rank_reason(mine, self.env)
        checkpoint = saved.name if saved is not None else None
        self.metrics.log({"step": self.step, "tokens": self.step * self.tokens_per_step, "kind": "preempt",
                          "signal": name, "checkpoint": checkpoint, "signal_to_checkpoint_s": seconds})
        raise Preempted(name, self.step, checkpoint, seconds)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test-only hook: AGDLM_FAULT_AT_STEP=N makes rank 1 (rank 0 on one process) die with
    os._exit(17) before step N+1, in the first attempt of a torchrun launch only
    (TORCHELASTIC_RESTART_COUNT unset or 0), so --max-restarts can be tested."""
    at = os.environ.get("AGDLM_FAULT_AT_STEP")
    if at is None or step != int(at) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if rank == min(1, int(os.environ.get("WORLD_SIZE", "1")) - 1):
        print(f"AGDLM_FAULT_AT_STEP: rank {rank} exits at step {step}", file=sys.stderr, flush=True)
        os._exit(17)


def _maybe_poison_gradient(step: int, rank: int, model: torch.nn.Module) -> None:
    """Test-only hook: AGDLM_FAULT_INF_GRAD_FROM_STEP=N puts an inf into one gradient element
    of rank 1 (rank 0 on one process) before every optimiser step after step N; the loss
    stays finite. Gradients that live in p.grad only (not DeepSpeed's buffers)."""
    at = os.environ.get("AGDLM_FAULT_INF_GRAD_FROM_STEP")
    if at is None or step < int(at) or rank != min(1, int(os.environ.get("WORLD_SIZE", "1")) - 1):
        return
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard
    if local.numel():
        local.view(-1)[0] = float("inf")


def train(cfg: Config, command_line: list[str] | None = None) -> dict:
    env = init_distributed(cfg)
    try:
        return Trainer(cfg, env, command_line).run()
    finally:
        if env.owns_process_group:
            shutdown_distributed()


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    parser = argparse.ArgumentParser(
        prog="agdlm train",
        description="Train a GPT. CONFIG files (YAML, merged in order; default: demo.yaml) then "
        "section.key=value overrides.",
        epilog="config sections and their keys (defaults):\n" + section_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*", metavar="CONFIG | section.key=value")
    return split_config_items(parser.parse_args(argv).items)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    files, overrides = parse_args(argv)
    cfg = None
    try:
        cfg = load_config(files or None, overrides)
        code = 0 if train(cfg, command_line=["agdlm", "train", *argv]) else 1
    except ConfigError as e:
        print(f"agdlm: config error: {e}", file=sys.stderr)
        code = 2
    except TrainingDiverged as e:
        print(f"agdlm: {e}", file=sys.stderr)
        code = 3
    except Preempted as e:  # the checkpoint is written: launching the run again resumes it
        print(f"agdlm: {e}", file=sys.stderr)
        code = PREEMPTED_EXIT_CODE
    except (ResumeRefused, DiskFullError, MetricsFileError, BindingInternalsMissing) as e:
        print(f"agdlm: {e}", file=sys.stderr)
        code = 2
    except (DataSourceError, FileNotFoundError) as e:  # checkpoint files are checked before they are read
        print(f"agdlm: data error: {e}", file=sys.stderr)
        code = 2
    # A worker is done (metrics closed, checkpoints written, group destroyed, or the error said):
    # skip the interpreter teardown, where gloo's threads can abort it (see exit_without_teardown)
    deepspeed = cfg is not None and cfg.parallel.backend == "deepspeed"
    if launched_as_worker() and (deepspeed or "TORCHELASTIC_RUN_ID" in os.environ):
        exit_without_teardown(code)
    return code
