"""One exported agdlm model as a safetensors file: tensors under agdlm's own names (nn.Linear
layout, padded vocab) and, in the file's string metadata, what rebuilds the model.

    metadata: {"format": "agdlm", "model_config": JSON of the model section,
               "step": "N", "source": the checkpoint folder, "tokenizer": "gpt2" | "bytes"}

A tied head is stored once (as transformer.wte.weight; safetensors refuses shared storage)
and filled back on read. Reading runs no code from the file, unlike a pickle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from agdlm.model import GPT, GPTConfig

FORMAT = "agdlm"


class ModelFileError(ValueError):
    """A file that is not an agdlm safetensors export, as one line naming it."""


def model_file_bytes(state: dict[str, torch.Tensor], model_cfg: GPTConfig, step: int, source: str,
                     tokenizer: str) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()
               if not (k == "lm_head.weight" and model_cfg.tie_embeddings)}
    metadata = {"format": FORMAT, "model_config": json.dumps(dataclasses.asdict(model_cfg)), "step": str(step),
                "source": source, "tokenizer": tokenizer}
    return save(tensors, metadata=metadata)


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict in agdlm names, the model section as a dict, the file's metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ModelFileError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise ModelFileError(f"{path}: not a model written by `agdlm export` (no agdlm metadata); "
                             "an HF folder is read as a folder")
    try:
        model_config = json.loads(metadata["model_config"])
    except ValueError as e:
        raise ModelFileError(f"{path}: damaged model_config metadata ({e})") from None
    if model_config.get("tie_embeddings", True) and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state, model_config, metadata


def gpt_config_of(model_config: dict, path: Path) -> GPTConfig:
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    try:
        return GPTConfig(**{k: v for k, v in model_config.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: unusable model_config ({e})") from None


def load_model_file(path: Path, device: str = "cpu") -> GPT:
    state, model_config, _ = read_model_file(path)
    model = GPT(gpt_config_of(model_config, path))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: its tensors do not fit its model_config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
