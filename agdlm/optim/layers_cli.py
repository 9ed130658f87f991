"""`agdlm layers [CONFIG ...] [section.key=value ...]`: print the AGD layer table of a config's
model without training (config files merge in order, as for `agdlm train`). The model is built
on the meta device, so gpt2-1.5b costs no memory."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from agdlm.config import ConfigError, load_config, section_help, split_config_items
    from agdlm.model import GPT
    from agdlm.optim import AGD, format_layer_table
    from agdlm.optim.rules import RuleError

    ap = argparse.ArgumentParser(prog="agdlm layers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config sections and defaults:\n" + section_help())
    ap.add_argument("items", nargs="*", metavar="CONFIG | section.key=value",
                    help="config files (default: demo.yaml), then overrides")
    ap.add_argument("--policy", default=None, help="override optim.policy")
    args = ap.parse_args(argv)
    files, overrides = split_config_items(args.items)
    try:
        cfg = load_config(files or None, overrides)
        with torch.device("meta"):
            model = GPT(cfg.model)
        opt = AGD(model, policy=args.policy or cfg.optim.policy, gain=cfg.optim.gain, variant=cfg.optim.variant)
    except (ConfigError, RuleError, ValueError) as e:
        print(f"agdlm layers: {e}", file=sys.stderr)
        return 2
    m = cfg.model
    print(f"model: n_layer={m.n_layer} n_head={m.n_head} n_embd={m.n_embd} block_size={m.block_size} "
          f"vocab_size={m.vocab_size} bias={m.bias} tie_embeddings={m.tie_embeddings}")
    print(format_layer_table(opt))
    return 0
