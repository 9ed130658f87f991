"""`agdlm export RUN_DIR OUT [--format safetensors|pt|hf] [--checkpoint step_N]`: one
consolidated model from any backend's checkpoint, on one process, without a process group.

Formats (default: pt when OUT ends in .pt, else safetensors):
  safetensors  OUT is one file: the fp32 state dict under agdlm's names (a tied head once)
               with the model section, step, source and tokenizer in its metadata
               (agdlm.model_file); nothing in it is a pickle. `agdlm sample`/`eval` and
               `model.init_from` read it.
  hf           OUT is a folder that transformers' GPT2LMHeadModel.from_pretrained loads
               without agdlm: model.safetensors, config.json, generation_config.json and,
               for data.tokenizer=gpt2, GPT-2's tokenizer files (agdlm.hf: Conv1D layout,
               exact GELU, zero biases for bias=false, vocab sliced to the tokenizer's ids).
  pt           the legacy pickle: {"model": state dict (fp32, CPU), "model_config": the model
               section, "step", "source"}; loads with `torch.load(OUT.pt, weights_only=True)`
               into `GPT(GPTConfig(**model_config))`.

Checkpoint layouts read here (what each backend writes in checkpoints/step_N/):
  single, ddp   model.pt                  the whole state dict
  fsdp2         dcp/                      torch.distributed.checkpoint shards
  deepspeed     deepspeed/                the engine's checkpoint (ZeRO 1/2/3), consolidated
                                          as DeepSpeed's zero_to_fp32 does (fp32 master weights)

The checkpoint is the latest one whose files match its manifest (agdlm.manifest); a newer
damaged one is named in a warning and left where it is. OUT's missing parent folders are
created (and removed again if the export fails).

Every file is read without running code from it (agdlm.parallel.safe_load): a run folder
from someone else is safe to export. A file holding a pickled type that no checkpoint needs
is refused; --trust-checkpoint loads it anyway, for a folder you made yourself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import torch

from agdlm.atomic_files import atomic_torch_save, atomic_write_bytes, read_json
from agdlm.checkpoint import NoReadableCheckpoint, checkpoints_dir, read_problem, readable_checkpoint
from agdlm.config import ConfigError, build_config, read_yaml_mapping
from agdlm.model import GPT, GPTConfig
from agdlm.parallel import CHECKPOINT_LAYOUT
from agdlm.parallel.safe_load import CheckpointReadError, dcp_load, deepspeed_fp32_state_dict, load_torch_file

TRUST_HINT = "if you made this run folder yourself, pass --trust-checkpoint to load it anyway"


FORMATS = ("safetensors", "pt", "hf")


class ExportError(Exception):
    """An operator mistake export refuses, as one line."""


def default_format(out: Path) -> str:
    return "pt" if Path(out).suffix == ".pt" else "safetensors"


def run_config(run_dir: Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an agdlm run directory?")
    return build_config(read_yaml_mapping(path))


def _trusted_state_dict(ckpt: Path, layout: str, model: GPT) -> dict:
    """The backends' own readers, which unpickle anything: only behind --trust-checkpoint."""
    if layout == "single":
        return torch.load(ckpt / CHECKPOINT_LAYOUT["single"], map_location="cpu", weights_only=False)
    if layout == "fsdp2":
        import torch.distributed.checkpoint as dcp

        state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        dcp.load({"model": state}, checkpoint_id=str(ckpt / CHECKPOINT_LAYOUT["fsdp2"]), no_dist=True)
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=CHECKPOINT_LAYOUT["deepspeed"])


def _safe_state_dict(ckpt: Path, layout: str, model: GPT) -> dict:
    if layout == "single":
        return load_torch_file(ckpt / CHECKPOINT_LAYOUT["single"])
    if layout == "fsdp2":
        state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        dcp_load({"model": state}, ckpt / CHECKPOINT_LAYOUT["fsdp2"], no_dist=True)
        return state
    return deepspeed_fp32_state_dict(ckpt / CHECKPOINT_LAYOUT["deepspeed"])


def checkpoint_layout(ckpt: Path) -> str:
    """Which backend family wrote `ckpt`: single (model.pt), fsdp2 (dcp/) or deepspeed."""
    model_file, dcp_dir, ds_tag = (CHECKPOINT_LAYOUT[b] for b in ("single", "fsdp2", "deepspeed"))
    if (ckpt / model_file).is_file():
        return "single"
    if (ckpt / dcp_dir).is_dir():
        return "fsdp2"
    if (ckpt / ds_tag).is_dir():
        return "deepspeed"
    raise CheckpointReadError(ckpt / model_file, f"missing: {ckpt} holds no {model_file}, {dcp_dir}/ or {ds_tag}/ checkpoint")


def _check_matches(state, model: GPT, source: Path) -> None:
    """Every tensor of the model present with its shape: a one-line error naming the first miss."""
    if not isinstance(state, dict):
        raise CheckpointReadError(source, "is not a model state dict")
    expected_names = model.state_dict().keys()
    extra = next((name for name in state if name not in expected_names), None)
    if extra is not None:
        raise CheckpointReadError(source, f"has an entry {extra!r} that the run's model (config.yaml) does not have")
    for name, expected in model.state_dict().items():
        found = state.get(name)
        if not isinstance(found, torch.Tensor):
            raise CheckpointReadError(source, f"has no tensor {name}: not a checkpoint of the run's model (config.yaml)")
        if found.shape != expected.shape:
            raise CheckpointReadError(source, f"{name} has shape {tuple(found.shape)}, the run's model "
                                              f"(config.yaml) needs {tuple(expected.shape)}")


def consolidated_state_dict(ckpt: Path, model_cfg, trust: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from one checkpoint folder of any backend, read safely
    unless `trust` (see agdlm.parallel.safe_load)."""
    ckpt = Path(ckpt)
    model = GPT(model_cfg)
    layout = checkpoint_layout(ckpt)
    state = (_trusted_state_dict if trust else _safe_state_dict)(ckpt, layout, model)
    if model_cfg.tie_embeddings and isinstance(state, dict):  # one tensor under two names: fill whichever is missing
        for a, b in (("lm_head.weight", "transformer.wte.weight"), ("transformer.wte.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    _check_matches(state, model, ckpt / CHECKPOINT_LAYOUT[layout])
    model.load_state_dict(state)  # strict: every tensor present with its logical shape
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}


def _refuse_live_checkpoint(run_dir: Path, out: Path) -> None:
    """OUT inside the run's checkpoints/ would overwrite (or sit among) the checkpoints a
    resume reads."""
    live = checkpoints_dir(run_dir).resolve()
    target = out.resolve()
    if target == live or live in target.parents:
        raise ExportError(f"refusing to write {out} inside the run's own checkpoints folder {live}; choose a path outside it")


def _writable_directory(out: Path) -> None:
    """OUT's folder exists and is writable, or can be made: its nearest existing ancestor is a
    writable folder."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: its directory {ancestor} is not writable")


@contextlib.contextmanager
def parent_folders(out: Path):
    """Create OUT's missing parent folders; remove the ones made here if the write fails."""
    made = []
    folder = out.parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for folder in reversed(made):
        try:
            folder.mkdir()
        except OSError as e:
            raise ExportError(f"cannot write {out}: cannot create {folder} ({e.strerror or e})") from None
    try:
        yield
    except BaseException:
        for folder in made:  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _save(payload: dict, out: Path) -> None:
    """atomic_torch_save (which removes its temporary file on any failure), with a failed
    write reported as one line."""
    try:
        atomic_torch_save(payload, out)
    except OSError as e:  # a full disk included: its strerror names the file
        raise ExportError(f"cannot write {out}: {e.strerror or _one_line(e)}") from None
    except RuntimeError as e:  # torch.save's stream writer reports I/O failures this way
        raise ExportError(f"cannot write {out}: {_one_line(e)}") from None


def _checkpoint_step(trainer: Path) -> int:
    """The step recorded in trainer.json; -1 where a checkpoint has none."""
    if not trainer.is_file():
        return -1
    try:
        return int(read_json(trainer)["step"])
    except (ValueError, KeyError, TypeError) as e:  # empty, truncated or edited by hand
        raise CheckpointReadError(trainer, f"damaged ({_one_line(e)})") from None


def export(run_dir: Path, out: Path, checkpoint: str | None = None, trust: bool = False,
           fmt: str | None = None, notes: list[str] | None = None, warnings: list[str] | None = None) -> Path:
    """Write the model of `checkpoint` (default: the latest whole one) as `fmt`
    (default_format(out)); lines worth telling the operator are appended to `notes` (e.g. no
    tokenizer written) and `warnings` (a damaged newer checkpoint passed over)."""
    run_dir, out = Path(run_dir), Path(out)
    fmt = fmt or default_format(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    _refuse_live_checkpoint(run_dir, out)
    _writable_directory(out)
    if fmt != "hf" and out.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory (--format hf writes a folder)")
    cfg = run_config(run_dir)
    if checkpoint:  # the operator's choice: checked, never replaced by another
        ckpt = checkpoints_dir(run_dir) / checkpoint
        if not ckpt.is_dir():
            raise FileNotFoundError(f"{run_dir} has no checkpoint {checkpoint}")
        problem = read_problem(ckpt)
        if problem:
            raise NoReadableCheckpoint(problem)
    else:
        ckpt, passed_over = readable_checkpoint(run_dir)
        if warnings is not None:
            warnings.extend(passed_over)
    state = consolidated_state_dict(ckpt, cfg.model, trust=trust)
    step = _checkpoint_step(ckpt / "trainer.json")
    with parent_folders(out):
        _write_format(fmt, state, cfg, ckpt, step, out, notes)
    return out


def _write_format(fmt: str, state: dict, cfg, ckpt: Path, step: int, out: Path, notes: list[str] | None) -> None:
    if fmt == "pt":
        _save({"model": state, "model_config": dataclasses.asdict(cfg.model), "step": step, "source": str(ckpt)}, out)
    elif fmt == "safetensors":
        from agdlm.model_file import model_file_bytes

        _write(lambda: atomic_write_bytes(out, model_file_bytes(state, cfg.model, step, str(ckpt), cfg.data.tokenizer)),
               out)
    else:
        written = _write(lambda: _write_hf_folder(state, cfg, out, step), out)
        if notes is not None:
            notes.extend(written)


def _write_hf_folder(state: dict, cfg, out: Path, step: int) -> list[str]:
    """Build the folder beside OUT, then move it into place: OUT is never half written. An
    existing OUT is replaced only when it is empty or an HF folder (has config.json)."""
    import shutil
    import tempfile

    from agdlm.hf import write_hf_folder

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
        raise ExportError(f"cannot write {out}: it exists and is not an HF model folder (no config.json)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        notes = write_hf_folder(state, cfg.model, tmp, cfg.data.tokenizer, step)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


def _write(write, out: Path):
    """Run `write`, reporting a failed write as one line (a full disk names the file)."""
    try:
        return write()
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or _one_line(e)}") from None


def load_exported(path: Path, device: str = "cpu") -> GPT:
    path = Path(path)
    payload = load_torch_file(path, map_location=device)
    if not isinstance(payload, dict) or not {"model", "model_config"} <= payload.keys():
        raise CheckpointReadError(path, "is not a model written by `agdlm export` (no model / model_config)")
    try:
        model = GPT(GPTConfig(**payload["model_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointReadError(path, f"has an unusable model_config ({_one_line(e)})") from None
    _check_matches(payload["model"], model, path)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def explain(error: BaseException) -> str:
    """The one stderr line for a failure of export or sample."""
    text = _one_line(error)
    if isinstance(error, CheckpointReadError) and error.refused_type:
        text += f"; {TRUST_HINT}"
    return text


# What export and sample report as one line (exit 2) instead of a traceback.
OPERATOR_ERRORS = (CheckpointReadError, NoReadableCheckpoint, ExportError, ConfigError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path, help="a file (safetensors, pt) or a folder (hf)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="safetensors (default), hf (a transformers GPT-2 folder) or pt (legacy pickle; "
                             "the default when OUT ends in .pt)")
    parser.add_argument("--checkpoint", default=None, help="a folder name under checkpoints/ (default: latest)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load pickled objects that no checkpoint needs (only for a run folder you made)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        notes: list[str] = []
        warnings: list[str] = []
        out = export(args.run_dir, args.out, args.checkpoint, trust=args.trust_checkpoint, fmt=args.format, notes=notes,
                     warnings=warnings)
    except OPERATOR_ERRORS as e:
        print(f"agdlm export: {explain(e)}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"agdlm export: warning: {warning}", file=sys.stderr)
    for note in notes:
        print(f"agdlm export: note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
