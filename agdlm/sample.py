"""`agdlm sample RUN_DIR|HF_DIR|FILE --prompt TEXT [--greedy]`: generate text from a run's
latest checkpoint (any backend), an HF GPT-2 folder or a model exported by `agdlm export`
(.safetensors or .pt). Checkpoints are read without running code from them (see `agdlm
export --help`); --trust-checkpoint as there. --greedy takes the most likely token at each
step (among the tokenizer's ids), as transformers' generate(do_sample=False) does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from agdlm.data.tokenizer import encoding_for
from agdlm.export import OPERATOR_ERRORS, explain
from agdlm.loading import load_model_from
from agdlm.model import GPT


class SampleArgumentError(ValueError):
    """A sampling option that cannot work, as one line naming the flag."""


def load_model(path: Path, device: str = "cpu", trust: bool = False) -> GPT:
    """The GPT of a run's latest checkpoint, an HF GPT-2 folder, or a file written by
    `agdlm export`. A sharded checkpoint (FSDP2, DeepSpeed) is consolidated on the fly, as
    export does."""
    return load_model_from(path, device, trust=trust).model


@torch.no_grad()
def greedy_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, n_vocab: int) -> torch.Tensor:
    """The most likely next token, step by step; padded vocab rows (ids >= n_vocab) never win."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1, :n_vocab].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


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
    if not args.temperature > 0 and not args.greedy:
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
    parser.add_argument("--greedy", action="store_true",
                        help="always the most likely token (no sampling: --temperature and --top-k are ignored)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load pickled objects that no checkpoint needs (only for a run folder you made)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_sampling_args(args)
        loaded = load_model_from(args.run_dir, args.device, trust=args.trust_checkpoint)
        model, enc = loaded.model, encoding_for(loaded.tokenizer)
        for warning in loaded.warnings:
            print(f"agdlm sample: warning: {warning}", file=sys.stderr)
    except (SampleArgumentError, *OPERATOR_ERRORS) as e:
        print(f"agdlm sample: {explain(e)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    ids = enc.encode_ordinary(args.prompt) or [enc.eot_token]
    x = torch.tensor([ids], dtype=torch.long, device=args.device)
    for _ in range(args.num_samples):
        if args.greedy:
            out = greedy_generate(model, x, args.max_new_tokens, enc.n_vocab)
        else:
            out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        tokens = [t for t in out[0].tolist() if t < enc.n_vocab]  # padded vocab rows are never text
        print(enc.decode(tokens))
        print("-" * 40)
    return 0
