"""`agdlm sample RUN_DIR --prompt TEXT`: generate text from a run's latest checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from agdlm.checkpoint import latest_checkpoint
from agdlm.config import build_config
from agdlm.data.tokenizer import EOT_TOKEN, gpt2_encoding
from agdlm.model import GPT


def load_model(run_dir: Path, device: str = "cpu") -> GPT:
    """The GPT of a run's latest checkpoint (single-file model.pt, or a consolidated
    export.pt written by `agdlm export` for sharded backends)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} an agdlm run directory?")
    cfg = build_config(yaml.safe_load(cfg_path.read_text()))
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    model_file = ckpt / "model.pt"
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{ckpt} holds a sharded checkpoint; run `agdlm export {run_dir} OUT.pt` and sample from that"
        )
    model = GPT(cfg.model)
    model.load_state_dict(torch.load(model_file, map_location=device, weights_only=True))
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm sample", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model = load_model(args.run_dir, args.device)
    except FileNotFoundError as e:
        print(f"agdlm sample: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    enc = gpt2_encoding()
    ids = enc.encode_ordinary(args.prompt) or [EOT_TOKEN]
    x = torch.tensor([ids], dtype=torch.long, device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        tokens = [t for t in out[0].tolist() if t < enc.n_vocab]  # padded vocab rows are never text
        print(enc.decode(tokens))
        print("-" * 40)
    return 0
