"""lm-evaluation-harness on an `agdlm export --format hf` folder (issue 22): what
`pip install "agdlm[eval]"` installs runs lm-eval's `--model hf` backend, offline, and on the same
multiple-choice items its acc equals `agdlm eval --choice`'s, item by item. The task is written
here (a local .jsonl through lm-eval's task YAML); nothing is downloaded. Skipped where lm_eval
is not installed (the `eval` extra is not part of `dev`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat dog sat ran on under over mat log house tree quickly slowly red blue green".split()

TASK = """task: agdlm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

hf_dir, task_dir, out = sys.argv[1:4]
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["agdlm_choice"],
                                  task_manager=TaskManager(include_path=task_dir), device="cpu", batch_size=1,
                                  log_samples=True)
samples = sorted(results["samples"]["agdlm_choice"], key=lambda s: s["doc_id"])
picks = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
json.dump({"acc": results["results"]["agdlm_choice"]["acc,none"], "picks": picks}, open(out, "w"))
"""


def write_items(path: Path, n: int = 12) -> Path:
    import random

    rng = random.Random(0)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            item = {"ctx": sentence(8).capitalize() + ".", "endings": [sentence(4) + "." for _ in range(3)],
                    "label": rng.randrange(3)}
            f.write(json.dumps(item) + "\n")
    return path


def test_lm_eval_scores_an_export_as_agdlm_eval_does(tmp_path, tiny_overrides):
    from agdlm.config import load_config
    from agdlm.evaluate import ending_losses, main as eval_main, read_choice_items
    from agdlm.export import export
    from agdlm.data.tokenizer import encoding_for
    from agdlm.loading import load_model_from
    from agdlm.train import train

    run = train(load_config(None, tiny_overrides + ["train.max_steps=3", "model.block_size=64", "train.run_name=lm"]))
    hf_dir = export(Path(run["run_dir"]), tmp_path / "hf", fmt="hf")
    items = write_items(tmp_path / "items.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "agdlm_choice.yaml").write_text(TASK.format(items=items))

    assert eval_main([str(hf_dir), "--choice", str(items), "--device", "cpu"]) == 0
    ours = json.loads((hf_dir / "eval.json").read_text())["choice"][str(items)]
    model = load_model_from(hf_dir).model
    encoding = encoding_for("gpt2")
    our_picks = []
    for item in read_choice_items(items):
        scores = ending_losses(model, encoding, item["ctx"], item["endings"])
        our_picks.append(min(range(len(scores)), key=lambda i: scores[i][0]))  # acc: the lowest total loss

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", LM_EVAL, str(hf_dir), str(tmp_path / "tasks"),
                             str(tmp_path / "lm_eval.json")], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = json.loads((tmp_path / "lm_eval.json").read_text())
    assert theirs["picks"] == our_picks
    assert theirs["acc"] == ours["acc"]
