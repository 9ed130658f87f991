"""`model.init_from: PATH`: start a model from existing weights, an HF GPT-2 folder (from
`agdlm export --format hf`, or transformers' `save_pretrained`, e.g. of `gpt2`) or an
`agdlm export` .safetensors file. Only safetensors are read.

The run's model section says what is built; the weights must fit it. Allowed on the way:
a shorter block_size (position rows cropped, as nanoGPT's crop_block_size), an untied model
from a tied source (the head starts as a copy of wte), bias=false from a source whose biases
are all zero (dropped) and bias=true from one without biases (zeros). Anything else is one
line that names the overrides that would fit."""

from __future__ import annotations

from pathlib import Path

import torch

from agdlm.config import ConfigError
from agdlm.hf import HFFormatError, bias_names, bias_rows, model_fields_of, read_hf_folder
from agdlm.model import GPT, GPTConfig
from agdlm.model_file import ModelFileError, gpt_config_of, read_model_file

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size")


class InitFromError(ConfigError):
    """Weights that cannot start this model, as one line."""


class SourceWeights:
    """Weights in agdlm names with the model fields they were saved under."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], fields: dict, tokenizer: str, warnings: list[str]):
        self.path, self.state, self.fields, self.tokenizer, self.warnings = path, state, fields, tokenizer, warnings


def read_source(path: str | Path) -> SourceWeights:
    path = Path(path)
    try:
        if path.is_dir():
            state, config, warnings = read_hf_folder(path)
            tokenizer = (config.get("agdlm") or {}).get("tokenizer", "gpt2")
            return SourceWeights(path, state, model_fields_of(config, state), tokenizer, warnings)
        if path.suffix == ".safetensors":
            state, model_config, metadata = read_model_file(path)
            fields = {k: v for k, v in vars(gpt_config_of(model_config, path)).items() if k in
                      (*SHAPE_FIELDS, "block_size", "bias", "tie_embeddings")}
            return SourceWeights(path, state, fields, metadata.get("tokenizer", "gpt2"), [])
    except (HFFormatError, ModelFileError) as e:
        raise InitFromError(str(e)) from None
    if path.suffix == ".pt":
        raise InitFromError(f"{path}: a pickled .pt is not read here; export safetensors instead "
                            f"(`agdlm export RUN_DIR {path.with_suffix('.safetensors').name}`)")
    raise InitFromError(f"{path}: not an HF GPT-2 folder (with config.json) nor an `agdlm export` .safetensors file")


def _misfits(source: SourceWeights, cfg: GPTConfig) -> list[tuple[str, object]]:
    """(model key, the value that would fit) for each way the weights do not fit `cfg`."""
    f = source.fields
    fixes = [(k, f[k]) for k in SHAPE_FIELDS if f[k] != getattr(cfg, k)]
    if cfg.block_size > f["block_size"]:
        fixes.append(("block_size", f["block_size"]))
    if f["bias"] and not cfg.bias:
        fixes.append(("bias", "true"))
    if not f["tie_embeddings"] and cfg.tie_embeddings:
        fixes.append(("tie_embeddings", "false"))
    return fixes


def fitted_state(source: SourceWeights, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The source's weights as GPT(cfg)'s state dict; InitFromError if they do not fit."""
    fixes = _misfits(source, cfg)
    if fixes:
        have = ", ".join(f"{k}={source.fields[k]}" for k, _ in fixes)
        wanted = " ".join(f"model.{k}={v}" for k, v in fixes)
        raise InitFromError(f"model.init_from={source.path} holds a GPT with {have}, which this run's model does not "
                            f"fit; set {wanted}")
    state = dict(source.state)
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: cfg.block_size]
    if not cfg.bias:
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}  # all zero: checked above
    else:
        for name in bias_names(cfg):  # a source without biases: zeros compute what it computed
            state.setdefault(name, torch.zeros(bias_rows(name, cfg)))
    if not cfg.tie_embeddings and source.fields["tie_embeddings"]:
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    return state


def init_model(model: GPT, path: str | Path, tokenizer: str | None = None) -> list[str]:
    """Load the weights at `path` into `model` (in place); return warnings to print."""
    source = read_source(path)
    if tokenizer is not None and source.tokenizer != tokenizer:
        raise InitFromError(f"model.init_from={source.path} was trained with data.tokenizer={source.tokenizer}, "
                            f"this run uses data.tokenizer={tokenizer}")
    state = fitted_state(source, model.config)
    try:
        with torch.no_grad():
            model.load_state_dict(state)
    except RuntimeError as e:
        raise InitFromError(f"model.init_from={source.path}: {str(e).splitlines()[0]}") from None
    return source.warnings


def gpt_from(path: str | Path) -> tuple[GPT, str, list[str]]:
    """A GPT built from the source's own fields, its tokenizer name and warnings (for eval and
    sample on an HF folder or an exported file)."""
    source = read_source(path)
    model = GPT(GPTConfig(**source.fields))
    model.load_state_dict(fitted_state(source, model.config))
    return model.eval(), source.tokenizer, source.warnings
