"""`agdlm eval MODEL [--source S] [--choice FILE.jsonl]`: evaluate a run (its latest
checkpoint), an HF GPT-2 folder or an exported model file.

Loss: validation loss and perplexity on the held-out split of any data source, cut exactly
as training cuts it (documents + <|endoftext|>, the same val_fraction hash split, blocks of
block_size+1), every block once, in order. Runs trained with different val splits can so be
compared on one held-out set; on the run's own source, --max-blocks = eval_batches x
global_batch_size gives the trainer's own val_loss.

Choice: multiple choice in HellaSwag's .jsonl format ({"ctx", "endings": [...], "label"}):
each ending is scored by the model's loss on its tokens after the context (ending encoded
with a leading space); the pick is the lowest loss per token (acc_norm, as nanoGPT-derived
trainers score HellaSwag) and, for reference, the lowest total loss (acc).

Results go to eval.json next to the model (in the run or HF folder; <file>.eval.json for a
file), one entry per source or choice file, and to the run's W&B run when it logs to W&B.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agdlm.eval_results import RESULTS_FILE, read_results, record_results, results_path  # noqa: F401 (re-exported)
from agdlm.loading import LoadedModel, load_model_from


class EvalError(ValueError):
    """An eval input that cannot work, as one line."""


# ---- loss on a data source --------------------------------------------------------------

def eval_config(loaded: LoadedModel, source: str, val_fraction: float | None, max_blocks: int, batch_size: int,
                block_size: int | None):
    """The run's config (defaults for an HF folder or file) with the data and batch settings
    of this eval: training's data path then cuts the source exactly as it would for the run."""
    import dataclasses

    from agdlm.config import build_config, read_yaml_mapping

    raw = read_yaml_mapping(loaded.run_dir / "config.yaml") if loaded.run_dir else {}
    raw = {section: dict(values) for section, values in raw.items()}
    model = raw.setdefault("model", {})
    model.update({**dataclasses.asdict(loaded.model.config), "init_from": None})  # the weights are loaded
    model["block_size"] = block_size or loaded.model.config.block_size
    if model["block_size"] > loaded.model.config.block_size:
        raise EvalError(f"--block-size {block_size} exceeds the model's block_size {loaded.model.config.block_size}")
    data = raw.setdefault("data", {})
    data.update(source=source, tokenizer=loaded.tokenizer)
    if val_fraction is not None:
        data["val_fraction"] = val_fraction
    raw.setdefault("train", {}).update(global_batch_size=batch_size, micro_batch_size=batch_size,
                                       eval_batches=math.ceil(max_blocks / batch_size))
    raw["parallel"] = {"backend": "single"}
    raw["log"] = {"wandb": "off"}
    return build_config(raw)


@torch.no_grad()
def loss_on_blocks(model: torch.nn.Module, store, max_blocks: int, batch_size: int, device: str) -> dict:
    """Mean next-token loss over the store's first `max_blocks` blocks, each block once."""
    from agdlm.data.packing import rows_to_xy

    n_blocks = min(store.num_blocks, max_blocks)
    total, tokens = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        x, y = rows_to_xy(store.rows(np.arange(start, min(start + batch_size, n_blocks))))
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        tokens += y.numel()
    val_loss = total / tokens
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "blocks": n_blocks, "tokens": tokens}


def evaluate_loss(loaded: LoadedModel, source: str, val_fraction: float | None = None, max_blocks: int = 256,
                  batch_size: int = 8, block_size: int | None = None, device: str = "cpu") -> dict:
    from agdlm.data import build_data

    cfg = eval_config(loaded, source, val_fraction, max_blocks, batch_size, block_size)
    data = build_data(cfg)
    result = loss_on_blocks(loaded.model, data.val.store, max_blocks, batch_size, device)
    return {"source": source, "val_fraction": cfg.data.val_fraction, "block_size": cfg.model.block_size,
            "tokenizer": cfg.data.tokenizer, **result}


# ---- multiple choice ------------------------------------------------------------------------

def read_choice_items(path: Path) -> list[dict]:
    """HellaSwag-format items: ctx (or ctx_a + ctx_b), endings (at least 2), label."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: unreadable ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ctx = item["ctx"] if "ctx" in item else f"{item['ctx_a']} {item['ctx_b'].capitalize()}".strip()
            endings, label = [str(e) for e in item["endings"]], int(item["label"])
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"{path} line {number}: not a HellaSwag item with ctx, endings and label ({e!r})") from None
        if len(endings) < 2 or not 0 <= label < len(endings):
            raise EvalError(f"{path} line {number}: needs at least 2 endings and a label among them")
        items.append({"ctx": str(ctx), "endings": endings, "label": label})
    if not items:
        raise EvalError(f"{path}: no items")
    return items


@torch.no_grad()
def ending_losses(model, encoding, ctx: str, endings: list[str], device: str = "cpu") -> list[tuple[float, int]]:
    """(total loss, token count) of each ending after the context; the context is cut from
    the left when context + ending exceed the model's block_size."""
    block_size = model.config.block_size
    ctx_tokens = encoding.encode_ordinary(ctx)
    scores = []
    for ending in endings:
        end_tokens = encoding.encode_ordinary(" " + ending)
        if len(end_tokens) >= block_size:
            raise EvalError(f"an ending of {len(end_tokens)} tokens does not fit block_size {block_size}")
        tokens = (ctx_tokens + end_tokens)[-(block_size + 1):]
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits, _ = model(ids[:, :-1], ids[:, 1:])  # targets given: logits at every position
        losses = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
        scores.append((losses[-len(end_tokens):].sum().item(), len(end_tokens)))
    return scores


def evaluate_choice(loaded: LoadedModel, path: Path, limit: int | None = None, device: str = "cpu") -> dict:
    from agdlm.data.tokenizer import encoding_for

    items = read_choice_items(path)[:limit]
    encoding = encoding_for(loaded.tokenizer)
    correct = correct_norm = 0
    predictions = []
    for item in items:
        scores = ending_losses(loaded.model, encoding, item["ctx"], item["endings"], device)
        pick = min(range(len(scores)), key=lambda i: scores[i][0])
        pick_norm = min(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1])
        correct += pick == item["label"]
        correct_norm += pick_norm == item["label"]
        predictions.append(pick_norm)
    n = len(items)
    return {"file": str(path), "items": n, "acc_norm": correct_norm / n, "acc": correct / n,
            "predictions": predictions}


# ---- results ------------------------------------------------------------------------------

def log_to_wandb(run_dir: Path, summary: dict) -> None:
    """Add `summary` to the run's own W&B run (its wandb_id), when the run logs to W&B."""
    from agdlm.export import run_config
    from agdlm.metrics import resolve_wandb_mode

    cfg = run_config(run_dir)
    id_file = run_dir / "wandb_id"
    if cfg.log.wandb == "off" or not id_file.is_file():
        return
    import wandb

    run = wandb.init(mode=resolve_wandb_mode(cfg.log.wandb), dir=str(run_dir), id=id_file.read_text().strip(),
                     resume="allow", project=cfg.log.project, entity=cfg.log.entity,
                     settings=wandb.Settings(console="off"))
    run.summary.update(summary)
    run.finish()


def wandb_summary(kind: str, key: str, result: dict) -> dict:
    name = Path(key).stem if kind == "choice" else Path(key).name or key
    return {f"eval/{kind}/{name}/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, metavar="RUN_DIR|HF_DIR|FILE")
    p.add_argument("--source", help="data source for the loss (default: the run's data.source; demo otherwise)")
    p.add_argument("--val-fraction", type=float, help="held-out fraction of --source (default: the run's)")
    p.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to score (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, help="block length (default: the model's block_size)")
    p.add_argument("--choice", type=Path, metavar="FILE.jsonl", help="multiple-choice items in HellaSwag's format")
    p.add_argument("--limit", type=int, help="score only the first N choice items")
    p.add_argument("--out", type=Path, help=f"results file (default: {RESULTS_FILE} next to the model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load pickled objects that no checkpoint needs (only for a run folder you made)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    from agdlm.data import DataSourceError
    from agdlm.export import OPERATOR_ERRORS, explain

    try:
        if args.max_blocks < 1 or args.batch_size < 1:
            raise EvalError("--max-blocks and --batch-size must be at least 1")
        loaded = load_model_from(args.model, args.device, trust=args.trust_checkpoint)
        for warning in loaded.warnings:
            print(f"agdlm eval: warning: {warning}", file=sys.stderr)
        out = args.out or results_path(args.model)
        jobs = []
        if args.source or not args.choice:
            source = args.source or (_run_source(loaded) if loaded.run_dir else "demo")
            jobs.append(("loss", source, lambda s=source: evaluate_loss(
                loaded, s, args.val_fraction, args.max_blocks, args.batch_size, args.block_size, args.device)))
        if args.choice:
            jobs.append(("choice", str(args.choice), lambda: evaluate_choice(loaded, args.choice, args.limit, args.device)))
        summary = {}
        for kind, key, job in jobs:
            started = time.perf_counter()
            result = {**job(), "step": loaded.step, "seconds": round(time.perf_counter() - started, 2)}
            record_results(out, kind, key, result)
            summary.update(wandb_summary(kind, key, result))
            print(_result_line(kind, result))
        if loaded.run_dir is not None:
            log_to_wandb(loaded.run_dir, summary)
    except (EvalError, DataSourceError, *OPERATOR_ERRORS) as e:
        print(f"agdlm eval: {explain(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _run_source(loaded: LoadedModel) -> str:
    from agdlm.export import run_config

    return run_config(loaded.run_dir).data.source


def _result_line(kind: str, result: dict) -> str:
    if kind == "loss":
        return (f"{result['source']}: val loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f} "
                f"({result['blocks']} blocks, {result['tokens']:,} tokens)")
    return f"{result['file']}: acc_norm {result['acc_norm']:.4f}, acc {result['acc']:.4f} ({result['items']} items)"
