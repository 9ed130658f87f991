"""A model to run, from whatever holds one: a run folder (its latest checkpoint, any backend),
an HF GPT-2 folder (`agdlm export --format hf`, or transformers' save_pretrained), an
`agdlm export` .safetensors file or a legacy `agdlm export` .pt file. Used by sample and
eval; nothing here trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agdlm.model import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: str  # data.tokenizer the model was trained with: gpt2 | bytes
    run_dir: Path | None  # the run folder, when the model came from one
    step: int | None  # the checkpoint's step, when known
    warnings: list[str]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_model_from(path: str | Path, device: str = "cpu", trust: bool = False) -> LoadedModel:
    path = Path(path)
    if is_run_dir(path):
        return _from_run_dir(path, device, trust)
    if is_hf_dir(path) or path.suffix == ".safetensors":
        from agdlm.init_from import gpt_from

        model, tokenizer, warnings = gpt_from(path)
        return LoadedModel(model.to(device), tokenizer, None, _step_of_source(path), warnings)
    if path.is_file():  # a legacy .pt export: read with the weights-only loader
        from agdlm.export import load_exported

        return LoadedModel(load_exported(path, device), "gpt2", None, None, [])
    raise FileNotFoundError(f"{path}: not a run folder (config.yaml), an HF GPT-2 folder (config.json) or an "
                            "exported model file")


def _from_run_dir(run_dir: Path, device: str, trust: bool) -> LoadedModel:
    """The newest checkpoint that matches its manifest; newer damaged ones are named in warnings."""
    from agdlm.atomic_files import read_json
    from agdlm.checkpoint import readable_checkpoint
    from agdlm.export import consolidated_state_dict, run_config

    cfg = run_config(run_dir)
    ckpt, warnings = readable_checkpoint(run_dir)
    model = GPT(cfg.model)
    model.load_state_dict(consolidated_state_dict(ckpt, cfg.model, trust=trust))
    trainer = ckpt / "trainer.json"
    step = int(read_json(trainer)["step"]) if trainer.is_file() else None
    return LoadedModel(model.to(device).eval(), cfg.data.tokenizer, run_dir, step, warnings)


def _step_of_source(path: Path) -> int | None:
    import json

    try:
        if path.is_dir():
            return int(json.loads((path / "config.json").read_text())["agdlm"]["step"])
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
