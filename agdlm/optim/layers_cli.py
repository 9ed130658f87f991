"""`agdlm layers CONFIG [section.key=value ...]`: print the AGD layer table of a config's
model without training. The model is built on the meta device, so gpt2-1.5b costs no memory."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> int:
    from agdlm.config import load_config, section_help
    from agdlm.model import GPT
    from agdlm.optim import AGD, format_layer_table

    ap = argparse.ArgumentParser(prog="agdlm layers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config sections and defaults:\n" + section_help())
    ap.add_argument("config", nargs="?", default=None, help="a config file (default: demo.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--policy", default=None, help="override optim.policy")
    args = ap.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides given
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = GPT(cfg.model)
    opt = AGD(model, policy=args.policy or cfg.optim.policy, gain=cfg.optim.gain, variant=cfg.optim.variant)
    m = cfg.model
    print(f"model: n_layer={m.n_layer} n_head={m.n_head} n_embd={m.n_embd} block_size={m.block_size} "
          f"vocab_size={m.vocab_size} bias={m.bias} tie_embeddings={m.tie_embeddings}")
    print(format_layer_table(opt))
    return 0
