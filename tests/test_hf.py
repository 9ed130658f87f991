"""Hugging Face transformers both ways, offline, with the real library: `agdlm export --format
hf` loads in GPT2LMHeadModel with agdlm's logits (bias on/off, tied/untied), a GPT-2 that
transformers made starts an agdlm run (model.init_from) with its logits, and greedy
generation agrees token for token. Also the default safetensors export."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local folders: never ask the hub
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from agdlm.atomic_files import atomic_write_text, write_json  # noqa: E402
from agdlm.config import ConfigError, config_to_yaml, load_config  # noqa: E402
from agdlm.data.tokenizer import encoding_for  # noqa: E402
from agdlm.export import main as export_main  # noqa: E402
from agdlm.init_from import InitFromError, init_model  # noqa: E402
from agdlm.loading import load_model_from  # noqa: E402
from agdlm.model import GPT  # noqa: E402
from agdlm.sample import main as sample_main  # noqa: E402
from agdlm.train import train  # noqa: E402

SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
N_VOCAB = 50257


def fake_run(root: Path, name: str, overrides: list[str], seed: int = 0, weight_std: float | None = None):
    """A run folder as the single backend leaves it, holding a random model whose biases and
    LayerNorms are not at their init (so a dropped or misplaced one shows); `weight_std`
    widens the matrices so that greedy decoding does not repeat one token."""
    cfg = load_config(None, SHAPE + [f"train.out_dir={root}", f"train.run_name={name}", *overrides])
    torch.manual_seed(seed)
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") or ".ln_" in pname or "ln_f" in pname:
                p.normal_(0.5, 0.2)
            elif weight_std is not None:
                p.normal_(0.0, weight_std)
    run = root / name
    step = run / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    atomic_write_text(run / "config.yaml", config_to_yaml(cfg))
    torch.save(model.state_dict(), step / "model.pt")
    write_json(step / "trainer.json", {"step": 3, "tokens": 0, "world_size": 1})
    (run / "checkpoints" / "latest").write_text("step_3\n")
    return run, model


def agdlm_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(ids, torch.zeros_like(ids))  # targets given: logits at every position
    return logits


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_has_agdlm_logits(tmp_path, bias, tie):
    run, model = fake_run(tmp_path, "r", [f"model.bias={bias}", f"model.tie_embeddings={tie}"])
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "hf"]) == 0

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, N_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(ids).logits
    assert hf_logits.shape == (2, 32, N_VOCAB)  # padding rows sliced off
    assert (hf_logits - agdlm_logits(model, ids)[..., :N_VOCAB]).abs().max().item() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["n_positions"] == 32
    assert config["tie_word_embeddings"] is tie and config["agdlm"]["padded_vocab_size"] == 50304
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) is (not tie)  # a tied head is saved once
    assert not any(n.endswith(".attn.bias") for n in names)  # causal-mask buffers are not weights


def test_hf_export_tokenizer_loads_offline_and_matches(tmp_path):
    run, _ = fake_run(tmp_path, "r", [])
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "hf"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    enc = encoding_for("gpt2")
    text = "Hello world, it's AGD!\n\n  def f(x):\treturn 1 <|endoftext|> naïve 東京"
    assert tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == enc.eot_token == json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_bytes_tokenizer_run_exports_without_a_tokenizer(tmp_path, capsys):
    run, model = fake_run(tmp_path, "b", ["data.tokenizer=bytes", "model.vocab_size=320"])
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "hf"]) == 0
    assert "no HF tokenizer written" in capsys.readouterr().err
    assert not (out / "vocab.json").exists()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - agdlm_logits(model, ids)[..., :257]).abs().max().item() <= 1e-4


def hf_random_model(folder: Path, **config) -> GPT2LMHeadModel:
    torch.manual_seed(2)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=N_VOCAB,
                                    activation_function="gelu", **config)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(folder)  # safetensors
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_hf_model_imports_with_its_logits(tmp_path, tie):
    folder = tmp_path / "made_by_transformers"
    hf = hf_random_model(folder, tie_word_embeddings=tie)
    cfg = load_config(None, SHAPE + ["model.vocab_size=50257", "model.bias=true", f"model.tie_embeddings={tie}",
                                     f"model.init_from={folder}", "optim.init=keep"])
    model = GPT(cfg.model).eval()
    assert init_model(model, folder) == []
    ids = torch.randint(0, N_VOCAB, (2, 32))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (agdlm_logits(model, ids) - expected).abs().max().item() <= 1e-4
    loaded = load_model_from(folder)  # eval and sample read the folder the same way
    assert (agdlm_logits(loaded.model, ids) - expected).abs().max().item() <= 1e-4


def test_init_from_starts_a_run_from_the_hf_weights(tmp_path, agdlm_cache):
    folder = tmp_path / "hf"
    hf_random_model(folder)
    common = SHAPE + ["model.vocab_size=50257", "model.bias=true", f"model.init_from={folder}",
                      f"train.out_dir={tmp_path / 'runs'}", "train.global_batch_size=8", "train.micro_batch_size=4",
                      "train.eval_batches=2", "data.val_fraction=0.1", "train.max_steps=1"]
    with pytest.raises(ConfigError, match="optim.init=keep"):  # AGD's own init would overwrite them
        load_config(None, common)
    run = Path(train(load_config(None, common + ["optim.init=keep", "train.run_name=ft"]))["run_dir"])
    first_eval = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first_eval["kind"] == "eval" and first_eval["step"] == 0

    from agdlm.evaluate import main as eval_main, read_results

    assert eval_main([str(folder), "--source", "demo", "--val-fraction", "0.1", "--max-blocks", "16"]) == 0
    assert read_results(folder)["loss"]["demo"]["val_loss"] == pytest.approx(first_eval["val_loss"], abs=1e-5)


def test_init_from_that_does_not_fit_names_the_overrides(tmp_path):
    folder = tmp_path / "hf"
    hf_random_model(folder)
    cfg = load_config(None, SHAPE + ["model.n_embd=64", "model.bias=false", f"model.init_from={folder}",
                                     "optim.name=adamw"])
    with pytest.raises(InitFromError) as e:
        init_model(GPT(cfg.model), folder)
    message = str(e.value)
    assert "model.n_embd=32" in message and "model.vocab_size=50257" in message and "model.bias=true" in message
    assert "\n" not in message


def test_greedy_generation_matches_transformers(tmp_path, capsys):
    run, _ = fake_run(tmp_path, "g", [], weight_std=0.5)
    out = tmp_path / "hf"
    assert export_main([str(run), str(out), "--format", "hf"]) == 0
    enc = encoding_for("gpt2")
    prompt = "The meaning of life is"
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([enc.encode_ordinary(prompt)])
    with torch.no_grad():
        generated = hf.generate(ids, do_sample=False, max_new_tokens=20, attention_mask=torch.ones_like(ids))
    hf_tokens = generated[0, ids.shape[1]:].tolist()
    capsys.readouterr()
    assert sample_main([str(run), "--prompt", prompt, "--greedy", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out.split("\n" + "-" * 40)[0]
    ours = enc.encode(text, allowed_special="all")[ids.shape[1]:]
    cut = hf_tokens.index(enc.eot_token) + 1 if enc.eot_token in hf_tokens else 20  # HF stops at <|endoftext|>
    assert len(hf_tokens) == cut and ours[:cut] == hf_tokens and len(set(hf_tokens)) > 5
    assert text == enc.decode(ids[0].tolist() + ours)


def test_default_export_is_safetensors_and_round_trips(tmp_path):
    run, model = fake_run(tmp_path, "s", ["model.bias=true", "model.tie_embeddings=true"])
    out = tmp_path / "model.safetensors"
    assert export_main([str(run), str(out)]) == 0
    assert out.read_bytes()[8:9] == b"{"  # a JSON header, not a pickle
    ids = torch.randint(0, N_VOCAB, (1, 32))
    loaded = load_model_from(out)
    assert loaded.step == 3 and torch.equal(agdlm_logits(loaded.model, ids), agdlm_logits(model, ids))
    cfg = load_config(None, SHAPE + ["model.bias=true", "model.block_size=16", f"model.init_from={out}",
                                     "optim.name=adamw"])
    fresh = GPT(cfg.model).eval()
    init_model(fresh, out, tokenizer="gpt2")  # a shorter block: position rows cropped
    assert torch.equal(agdlm_logits(fresh, ids[:, :16]), agdlm_logits(model, ids[:, :16]))
    legacy = tmp_path / "model.pt"
    assert export_main([str(run), str(legacy)]) == 0 and legacy.read_bytes()[:2] == b"PK"  # torch.save's zip
