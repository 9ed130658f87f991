"""`agdlm prepare`: parallel tokenisation into uint16 train_*/val_* shards whose contents do
not depend on the number of workers; the trainer reads the folder; the data benchmark runs."""

from __future__ import annotations

import json

import numpy as np

from agdlm.config import Config
from agdlm.data import build_data
from agdlm.data.packing import is_validation_document, tokenize_documents
from agdlm.data.prepare import main as prepare_main
from agdlm.data.tokenizer import EOT_TOKEN, gpt2_encoding
from test_data_sources import make_docs, owt2_tar


def _tokens(folder, prefix):
    return np.concatenate([np.fromfile(p, "<u2") for p in sorted(folder.glob(f"{prefix}_*.bin"))])


def test_prepare_tar_with_workers_matches_single_process(tmp_path, capsys):
    docs = make_docs(70)
    tar = owt2_tar(tmp_path / "owt2.tar", [docs[:30], docs[30:]])
    one, two = tmp_path / "one", tmp_path / "two"
    assert prepare_main([str(tar), str(one), "--workers", "1", "--val-fraction", "0.1", "--no-progress"]) == 0
    assert prepare_main([str(tar), str(two), "--workers", "2", "--val-fraction", "0.1", "--shard-tokens", "700",
                         "--batch-docs", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "docs/s" in out and "tokens/s" in out
    enc = gpt2_encoding()
    train = [d for d in docs if not is_validation_document(d, 0.1)]
    val = [d for d in docs if is_validation_document(d, 0.1)]
    assert _tokens(one, "train").tolist() == tokenize_documents(train, enc).tolist()
    assert _tokens(one, "val").tolist() == tokenize_documents(val, enc).tolist()
    assert _tokens(two, "train").tolist() == _tokens(one, "train").tolist()
    assert len(list(two.glob("train_*.bin"))) > 2 and not list(two.glob("*.tmp"))
    meta = json.loads((two / "meta.json").read_text())
    assert meta["documents"] == {"train": len(train), "val": len(val)} and meta["eot_token"] == EOT_TOKEN
    assert (_tokens(two, "train") == EOT_TOKEN).sum() == len(train)
    # refuses to mix with an earlier preparation
    assert prepare_main([str(tar), str(two), "--no-progress"]) == 2


def test_trainer_reads_a_prepared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("AGDLM_CACHE", str(tmp_path / "cache"))
    assert prepare_main(["demo", str(tmp_path / "demo"), "--workers", "2", "--val-fraction", "0.05", "--no-progress"]) == 0
    cfg = Config()
    cfg.model.block_size, cfg.train.global_batch_size, cfg.train.micro_batch_size = 64, 8, 4
    cfg.data.source = str(tmp_path / "demo")
    data = build_data(cfg, rank=1, world_size=2)
    assert data.kind == "prepared"
    (x, y), = data.train.next_batch()
    assert x.shape == y.shape == (4, 64) and x.dtype.is_floating_point is False
    assert data.val.batch(0)[0][0].shape == (4, 64)


def test_data_benchmark_prints_its_figures(tmp_path, capsys):
    from agdlm.bench.data import main

    report = tmp_path / "bench.json"
    assert main(["--mb", "0.3", "--block-size", "64", "--shuffle-buffer", "8", "--global-batch", "32",
                 "--prepared-tokens", "50000", "--batches", "3", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    for label in ("(a) tiktoken", "(b) streaming loader", "(b)/(a)", "(c) pre-tokenised loader"):
        assert label in out
    figures = json.loads(report.read_text())
    assert figures["a_tokens_per_s"] > 0 and figures["b_tokens_per_s"] > 0 and figures["c_batch_ms_median"] > 0
