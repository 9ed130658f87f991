"""`agdlm sample RUN_DIR|OUT.pt --prompt TEXT`: generate text from a run's latest checkpoint
(any backend) or from a model exported by `agdlm export`. Checkpoints are read without
running code from them (see `agdlm export --help`); --trust-checkpoint as there."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from agdlm.checkpoint import latest_checkpoint
from agdlm.data.tokenizer import encoding_for
from agdlm.export import OPERATOR_ERRORS, consolidated_state_dict, explain, load_exported, run_config
from agdlm.model import GPT


class SampleArgumentError(ValueError):
    """A sampling option that cannot work, as one line naming the flag."""


def tokenizer_of(path: Path) -> str:
    """`data.tokenizer` of the run that made `path` (an exported file's folder may hold none: gpt2)."""
    path = Path(path)
    try:
        return run_config(path).data.tokenizer if path.is_dir() else "gpt2"
    except FileNotFoundError:
        return "gpt2"


def load_model(path: Path, device: str = "cpu", trust: bool = False) -> GPT:
    """The GPT of a run's latest checkpoint, or of a file written by `agdlm export`. A
    sharded checkpoint (FSDP2, DeepSpeed) is consolidated on the fly, as export does."""
    path = Path(path)
    if path.is_file():
        return load_exported(path, device)
    cfg = run_config(path)
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet (checkpoints/latest is missing)")
    model = GPT(cfg.model)
    model.load_state_dict(consolidated_state_dict(ckpt, cfg.model, trust=trust))
    return model.to(device).eval()


def checked_device(name: str) -> str:
    """`name` if this machine has that device, else a one-line SampleArgumentError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleArgumentError(f"--device {name}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SampleArgumentError(f"--device {name}: no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SampleArgumentError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def check_sampling_args(args) -> None:
    if args.top_k < 1:
        raise SampleArgumentError(f"--top-k {args.top_k}: must be at least 1 (sampling keeps the k most likely tokens)")
    if not args.temperature > 0:
        raise SampleArgumentError(f"--temperature {args.temperature}: must be greater than 0")
    if args.max_new_tokens < 0:
        raise SampleArgumentError(f"--max-new-tokens {args.max_new_tokens}: must be 0 or more")
    if args.num_samples < 1:
        raise SampleArgumentError(f"--num-samples {args.num_samples}: must be at least 1")
    checked_device(args.device)


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
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load pickled objects that no checkpoint needs (only for a run folder you made)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_sampling_args(args)
        model = load_model(args.run_dir, args.device, trust=args.trust_checkpoint)
        enc = encoding_for(tokenizer_of(args.run_dir))
    except (SampleArgumentError, *OPERATOR_ERRORS) as e:
        print(f"agdlm sample: {explain(e)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    ids = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    x = torch.tensor([ids], dtype=torch.long, device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        tokens = [t for t in out[0].tolist() if t < enc.n_vocab]  # padded vocab rows are never text
        print(enc.decode(tokens))
        print("-" * 40)
    return 0
