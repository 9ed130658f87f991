"""`agdlm eval`: held-out loss cut as training cuts it, and HellaSwag-format multiple choice
on items written here, checked against an independent computation."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from agdlm.config import load_config
from agdlm.data.tokenizer import encoding_for
from agdlm.evaluate import evaluate_choice, main as eval_main, read_results
from agdlm.loading import load_model_from
from agdlm.train import train

ITEMS = [  # HellaSwag's fields; the last uses ctx_a/ctx_b as the original files do
    {"ctx": "She picks up the kettle, fills it with water and", "label": 0,
     "endings": ["puts it on the stove.", "throws it out of the window.", "sings to the dog.", "paints the wall."]},
    {"ctx": "The man opens the door of the car and", "label": 1,
     "endings": ["eats the steering wheel.", "gets into the driver's seat.", "flies away.", "reads a poem."]},
    {"ctx": "To make tea, first boil the water. Then", "label": 2,
     "endings": ["freeze the cup.", "run a marathon.", "pour it over the tea leaves.", "close the window."]},
    {"ctx_a": "A child is building a sand castle on the beach.", "ctx_b": "she", "label": 3,
     "endings": ["drives a bus.", "writes a letter to the bank.", "climbs a ladder.", "adds a tower with her bucket."]},
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, agdlm_cache):
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("evalruns")
    cfg = load_config(None, TINY + [f"train.out_dir={out}", "train.run_name=ev", "train.max_steps=4",
                                    "train.eval_interval=4", "train.ckpt_interval=4"])
    train(cfg)
    return out / "ev", cfg


def last_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]["val_loss"]


def test_loss_on_the_runs_own_source_is_the_trainers_val_loss(tiny_run):
    run_dir, cfg = tiny_run
    blocks = cfg.train.eval_batches * cfg.train.global_batch_size
    assert eval_main([str(run_dir), "--max-blocks", str(blocks), "--batch-size", "4"]) == 0
    result = read_results(run_dir)["loss"]["demo"]
    assert result["val_loss"] == pytest.approx(last_val_loss(run_dir), abs=1e-5)
    assert result["blocks"] == blocks and result["tokens"] == blocks * cfg.model.block_size
    assert result["perplexity"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item())
    assert result["step"] == 4


def test_loss_on_another_source_with_its_own_split(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: " + "words and more words. " * 30}) + "\n"
                              for i in range(40)))
    out = tmp_path / "results.json"
    assert eval_main([str(run_dir), "--source", str(corpus), "--val-fraction", "0.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["loss"][str(corpus)]
    assert result["val_fraction"] == 0.5 and result["blocks"] > 0 and result["val_loss"] > 0


def reference_losses(model, enc, ctx: str, endings: list[str]) -> list[tuple[float, int]]:
    """Each ending's summed negative log-likelihood, from log-softmax over the whole sequence."""
    out = []
    ctx_ids = enc.encode_ordinary(ctx)
    for ending in endings:
        end_ids = enc.encode_ordinary(" " + ending)
        ids = torch.tensor([ctx_ids + end_ids])
        with torch.no_grad():
            logits, _ = model(ids, torch.zeros_like(ids))
        logp = F.log_softmax(logits[0, :-1].double(), dim=-1)
        nll = -sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(end_ids))
        out.append((nll, len(end_ids)))
    return out


def test_choice_scores_match_an_independent_computation(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    loaded = load_model_from(run_dir)
    result = evaluate_choice(loaded, items)
    enc = encoding_for("gpt2")
    expected_norm, expected_sum = [], []
    for item in ITEMS:
        ctx = item.get("ctx") or f"{item['ctx_a']} {item['ctx_b'].capitalize()}"
        scores = reference_losses(loaded.model, enc, ctx, item["endings"])
        expected_norm.append(min(range(4), key=lambda i: scores[i][0] / scores[i][1]))
        expected_sum.append(min(range(4), key=lambda i: scores[i][0]))
    assert result["items"] == 4 and result["predictions"] == expected_norm
    assert result["acc_norm"] == sum(p == it["label"] for p, it in zip(expected_norm, ITEMS)) / 4
    assert result["acc"] == sum(p == it["label"] for p, it in zip(expected_sum, ITEMS)) / 4


def test_choice_picks_the_ending_the_model_finds_most_likely(tiny_run, tmp_path):
    """Items whose endings are single words (one token each): the right one is the model's most
    likely next word, so every pick must be right."""
    run_dir, _ = tiny_run
    loaded = load_model_from(run_dir)
    enc = encoding_for("gpt2")
    lines = []
    for ctx in ("The weather today is", "In the morning we", "Python is a"):
        ids = torch.tensor([enc.encode_ordinary(ctx)])
        with torch.no_grad():
            logits, _ = loaded.model(ids)
        words = []
        for token in logits[0, -1, :enc.n_vocab].argsort(descending=True).tolist():
            text = enc.decode([token])
            if text.startswith(" ") and text[1:].isalpha() and enc.encode_ordinary(text) == [token]:
                words.append(text[1:])
            if len(words) == 4:
                break
        lines.append(json.dumps({"ctx": ctx, "endings": words[::-1], "label": 3}))  # most likely last
    items = tmp_path / "words.jsonl"
    items.write_text("\n".join(lines) + "\n")
    assert eval_main([str(run_dir), "--choice", str(items)]) == 0
    result = read_results(run_dir)["choice"][str(items)]
    assert result["acc_norm"] == 1.0 and result["acc"] == 1.0 and result["predictions"] == [3, 3, 3]


def test_bad_choice_file_is_one_line(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a"], "label": 0}\n')
    assert eval_main([str(run_dir), "--choice", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 1" in err
