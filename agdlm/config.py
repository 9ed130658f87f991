"""Typed run configuration: one dataclass per section, loaded from YAML, overridden by
dotted `section.key=value` arguments, validated with messages that name the key.

A YAML file may list other files under `include:` (paths relative to it, or to the
shipped configs folder); later files and then the file itself override earlier ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agdlm.model import GPTConfig
from agdlm.optim.registry import NAMES as OPTIMISER_NAMES
from agdlm.optim.registry import OptimiserRefused, kind_of
from agdlm.optim.variants import VARIANTS
from agdlm.preemption import signal_name_problem


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


ModelConfig = GPTConfig  # the model section is the model's own config


@dataclass
class OptimConfig:
    name: str = "agd"  # agd | adamw | muon | prodigy | schedulefree (agdlm.optim.registry)
    policy: str = "default"  # AGD: default | paper | agd_exp | modular
    init: str = "default"  # default: the optimiser's init (AGD's init_weights); keep: the weights as they start (model.init_from)
    variant: str = "none"  # AGD study variants on top of a policy (README "AGD variants"); none = faithful
    gain: float = 1.0  # AGD: not a learning rate; kept for experiments
    compile: bool = False  # AGD: torch.compile its step's scale arithmetic and updates (GPU launches; AdamW is fused already)
    lr: float | None = None  # the lr-swept optimisers from here on; None: the optimiser's default (AdamW 6e-4)
    min_lr: float | None = None  # None: lr / 10, as nanoGPT decays GPT-2's AdamW
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # set: warmup_steps = this fraction of the run's steps (AlgoPerf's 2%)
    lr_decay_steps: int | None = None  # None: decay over train.max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class DataConfig:
    source: str = "demo"  # "demo", a local file or folder, a prepared token folder, or a hub id
    val_fraction: float = 0.05
    num_workers: int = 0
    seed: int = 1337
    text_column: str = "text"
    shuffle_buffer: int = 1024  # streaming: blocks per shuffled chunk (0 or 1: no shuffle)
    mode: str = "auto"  # auto | memory | stream (local sources and hub ids; prepared folders ignore it)
    split: str = "train"  # the split a hub dataset streams through `datasets`
    tokenizer: str = "gpt2"  # gpt2 | bytes (UTF-8 bytes + EOT: vocab 257, for cheap studies)
    max_bad_fraction: float = 0.01  # stop when more than this fraction of records/members is unreadable


@dataclass
class TrainConfig:
    global_batch_size: int = 16  # sequences per optimiser step, across all ranks
    micro_batch_size: int = 16  # sequences per rank per forward
    max_steps: int = 200
    max_tokens: int | None = None  # if set, overrides max_steps
    eval_interval: int = 50
    eval_batches: int = 8
    ckpt_interval: int = 100
    ckpt_every_minutes: float | None = None  # also checkpoint once this many minutes passed since the last one
    keep_checkpoints: int = 2
    # signals that ask for a checkpoint at the next step boundary, then exit 75 (agdlm.preemption)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    max_skipped_steps: int = 3  # AGD: stop after this many consecutive steps skipped for a non-finite G
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    run_name: str = "demo"
    out_dir: str = "runs"
    profile: dict[str, int] | None = None  # {start: N, steps: K}: a torch profiler trace of K steps into <run_dir>/profile/


@dataclass
class ParallelConfig:
    backend: str = "single"  # single | ddp | fsdp2 | deepspeed
    zero_stage: int = 1
    replicate: int = 1  # FSDP2 HSDP replica groups (mesh = replicate x shard)
    # FSDP2 with gradient accumulation: true reduce-scatters every micro-batch (gradients stay
    # sharded: 1/N memory, one reduce-scatter per micro-batch); false keeps whole fp32 gradients
    # until the last micro-batch (one reduce-scatter per step, a whole model of gradients per rank)
    fsdp_reshard_grads: bool = True


@dataclass
class LogConfig:
    interval: int = 10
    wandb: str = "off"  # off | offline | online
    project: str = "agdlm"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False  # also write the scalars to <run_dir>/tensorboard/ (x-axis: tokens seen)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimiser step: global / (micro x world)."""
        t = self.train
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size x world size = {t.micro_batch_size} x {world_size} = {per_step}"
            )
        return t.global_batch_size // per_step

    def total_steps(self) -> int:
        t = self.train
        if t.max_tokens is not None:
            return math.ceil(t.max_tokens / (t.global_batch_size * self.model.block_size))
        return t.max_steps


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]

CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": OPTIMISER_NAMES,
    "optim.policy": ("default", "paper", "agd_exp", "modular"),
    "optim.variant": VARIANTS,
    "optim.init": ("default", "keep"),
    "data.tokenizer": ("gpt2", "bytes"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.backend": ("single", "ddp", "fsdp2", "deepspeed"),
    "parallel.zero_stage": (1, 2, 3),
    "log.wandb": ("off", "offline", "online"),
}

POSITIVE_INTS = (
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
    "train.global_batch_size", "train.micro_batch_size", "train.eval_interval", "train.eval_batches",
    "train.ckpt_interval", "train.keep_checkpoints", "log.interval", "parallel.replicate",
)  # fmt: skip


# ---- locating config files ---------------------------------------------------------------

def configs_root() -> Path:
    """The shipped configs folder (top-level configs/, installed as agdlm.configs)."""
    return Path(str(resources.files("agdlm.configs")))


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config by path, relative to another config, or inside the shipped folder
    (with or without the `configs/` prefix and `.yaml` suffix)."""
    name = str(name)
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    stripped = name[len("configs/"):] if name.startswith("configs/") else name
    candidates += [configs_root() / stripped, configs_root() / f"{stripped}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file not found: {name} (looked in the working directory and {configs_root()})")


# ---- loading, merging, overriding -----------------------------------------------------

def read_yaml_mapping(path: Path, expected: str = "a mapping of sections") -> dict[str, Any]:
    """A YAML file that must hold a mapping; a clear ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {expected}, got {type(raw).__name__}")
    return raw


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    raw = read_yaml_mapping(path)
    merged: dict[str, Any] = {}
    for inc in _include_list(path, raw.pop("include", None)):
        _deep_merge(merged, _read_yaml(resolve_config_path(inc, path.parent), seen + (path,)))
    _deep_merge(merged, raw)
    return merged


def _include_list(path: Path, includes: Any) -> list[str]:
    """`include:` as a list of file names: one name, a list of them, or nothing."""
    if includes is None or includes == "":
        return []
    names = [includes] if isinstance(includes, str) else includes
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: include must be a config file name or a list of them, got {includes!r}")
    return names


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def split_config_items(items: list[str]) -> tuple[list[str], list[str]]:
    """A command line's CONFIG files and section.key=value overrides, each in the given order."""
    return [a for a in items if "=" not in a], [a for a in items if "=" in a]


def parse_override(arg: str) -> tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form section.key=value")
    key, text = arg.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    for arg in overrides:
        key, value = parse_override(arg)
        section, name = key.split(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw[section][name] = value


def load_config(paths: str | Path | list | None = None, overrides: list[str] | None = None) -> Config:
    """Merge the config files in order (default: demo.yaml), then apply the overrides."""
    if paths is None or paths == []:
        paths = ["demo.yaml"]
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        _deep_merge(raw, _read_yaml(resolve_config_path(path)))
    apply_overrides(raw, overrides or [])
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> Config:
    sections = {}
    for section_name, section_raw in raw.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"unknown config section {section_name!r} (allowed: {', '.join(SECTIONS)})")
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{section_name}: expected a mapping of keys, got {section_raw!r}")
        sections[section_name] = _build_section(section_name, SECTIONS[section_name], section_raw)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def _build_section(section_name: str, cls: type, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {section_name}.{key} (allowed in {section_name}: {', '.join(fields)})"
            )
        kwargs[key] = _coerce(f"{section_name}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # PyYAML reads "1e6" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in the dataclasses


def validate(cfg: Config) -> None:
    d = cfg.to_dict()
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if d[section][name] not in allowed:
            raise ConfigError(f"{key}={d[section][name]!r} is not allowed (choose one of: {', '.join(map(str, allowed))})")
    kind = kind_of(cfg.optim.name)
    if cfg.optim.lr is None:  # written out resolved, so a run's config.yaml says the lr it used
        cfg.optim.lr = kind.default_lr
    for key in POSITIVE_INTS:
        section, name = key.split(".")
        if d[section][name] <= 0:
            raise ConfigError(f"{key}={d[section][name]} must be positive")
    m, t, o, dt = cfg.model, cfg.train, cfg.optim, cfg.data
    if m.n_embd % m.n_head != 0:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 0")
    if t.max_tokens is not None and t.max_tokens <= 0:
        raise ConfigError(f"train.max_tokens={t.max_tokens} must be positive")
    if t.micro_batch_size > t.global_batch_size:
        raise ConfigError(
            f"train.micro_batch_size={t.micro_batch_size} exceeds train.global_batch_size={t.global_batch_size}"
        )
    if t.global_batch_size % t.micro_batch_size != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}"
        )
    if not 0.0 < dt.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={dt.val_fraction} must be in (0, 1)")
    if not 0.0 <= dt.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={dt.max_bad_fraction} must be in [0, 1]")
    if t.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be at least 1")
    if dt.num_workers < 0:
        raise ConfigError(f"data.num_workers={dt.num_workers} must be >= 0")
    if dt.mode not in ("auto", "memory", "stream"):
        raise ConfigError(f"data.mode={dt.mode!r} is not allowed (choose one of: auto, memory, stream)")
    if dt.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={dt.shuffle_buffer} must be >= 0")
    if o.gain <= 0:
        raise ConfigError(f"optim.gain={o.gain} must be positive")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if o.min_lr is not None and not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive")
    if o.lr_decay_steps is not None and o.lr_decay_steps <= 0:
        raise ConfigError(f"optim.lr_decay_steps={o.lr_decay_steps} must be positive (or null: train.max_steps)")
    try:
        kind.check(cfg)
    except OptimiserRefused as e:
        raise ConfigError(str(e)) from None
    if cfg.parallel.replicate != 1 and cfg.parallel.backend != "fsdp2":
        raise ConfigError(
            f"parallel.replicate={cfg.parallel.replicate} (HSDP replicas) needs parallel.backend=fsdp2, "
            f"not {cfg.parallel.backend}"
        )
    if o.warmup_fraction is not None:
        if not 0 <= o.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={o.warmup_fraction} must be in [0, 1) (or null: optim.warmup_steps)")
        o.warmup_steps = round(o.warmup_fraction * cfg.total_steps())  # written out resolved, like optim.lr
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must each be in [0, 1)")
    if o.weight_decay < 0 or o.grad_clip < 0:
        raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
    if m.init_from and kind.initialises_weights(o):
        raise ConfigError(f"model.init_from={m.init_from!r} with optim.name={o.name}: its init_weights (part of the "
                          "algorithm) would overwrite those weights; set optim.init=keep to start from them")
    if t.ckpt_every_minutes is not None and not t.ckpt_every_minutes > 0:
        raise ConfigError(f"train.ckpt_every_minutes={t.ckpt_every_minutes} must be positive (or null: steps only)")
    for name in t.preempt_signals:
        problem = signal_name_problem(name)
        if problem:
            raise ConfigError(f"train.preempt_signals: {problem}")
    if t.profile is not None and (set(t.profile) != {"start", "steps"} or t.profile["start"] < 0
                                  or t.profile["steps"] < 1):
        raise ConfigError(f"train.profile={t.profile} must be {{start: N >= 0, steps: K >= 1}}")
    if not t.run_name or "/" in t.run_name or t.run_name in (".", ".."):
        raise ConfigError(f"train.run_name={t.run_name!r} must be a non-empty name without '/'")


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def section_help() -> str:
    """One block per section listing its keys and defaults, for `agdlm train --help`."""
    lines = []
    for name, cls in SECTIONS.items():
        defaults = cls()
        keys = ", ".join(f"{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(cls))
        lines.append(f"  {name}: {keys}")
    return "\n".join(lines)
