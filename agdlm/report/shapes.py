"""What a run's model shape implies: parameter counts and training FLOPs per token, from the
config's model section (the GPT is built on the meta device: no memory, no weights)."""

from __future__ import annotations

from functools import lru_cache

EMBEDDINGS = ("transformer.wte.", "transformer.wpe.", "lm_head.")

FLOPS_FORMULA = ("FLOPs per token = 6 N + 12 L d T: N the non-embedding parameters (the blocks and the "
                 "final LayerNorm; token and position embeddings and the head left out, as Kaplan et al. "
                 "count), L layers, d width, T block size (the attention scores and their weighted sum, "
                 "forward and backward, as the PaLM appendix counts). Compute = FLOPs per token x tokens.")


@lru_cache(maxsize=None)
def _counts(model_items: tuple) -> tuple[int, int] | None:
    """(all parameters with tied weights once, non-embedding parameters), or None for a config
    this version cannot build."""
    try:
        import torch

        from agdlm.model import GPT, GPTConfig

        known = {k: v for k, v in model_items if k in GPTConfig.__dataclass_fields__}
        with torch.device("meta"):
            model = GPT(GPTConfig(**known))
        total = model.num_params(non_embedding=False)
        body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(EMBEDDINGS))
        return total, body
    except Exception:  # a config this version cannot build: leave its figures empty
        return None


def _key(model: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in model.items() if not isinstance(v, (dict, list))))


def count_params(model: dict) -> int | None:
    """All parameters of the GPT the config describes (tied weights once)."""
    counts = _counts(_key(model))
    return counts[0] if counts else None


def non_embedding_params(model: dict) -> int | None:
    counts = _counts(_key(model))
    return counts[1] if counts else None


def flops_per_token(model: dict) -> float | None:
    """Training FLOPs per token (FLOPS_FORMULA)."""
    body = non_embedding_params(model)
    if body is None:
        return None
    return 6.0 * body + 12.0 * int(model["n_layer"]) * int(model["n_embd"]) * int(model["block_size"])
