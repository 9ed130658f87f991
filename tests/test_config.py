import subprocess
import sys

import pytest

from agdlm.config import ConfigError, load_config


def test_demo_is_the_default_and_resolves_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.data.source == "demo" and cfg.optim.name == "agd" and cfg.model.n_embd == 128
    assert cfg.grad_accum_steps(1) == 2 and cfg.grad_accum_steps(2) == 1  # valid on 1 and 2 ranks
    assert load_config("configs/gpt2-124m.yaml").model.n_layer == 12
    assert load_config(["gpt2-124m", "optim/adamw.yaml"]).optim.name == "adamw"


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.betas=[0.8,0.9]", "log.tags=a,b", "train.max_tokens=1000"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9) and cfg.log.tags == ["a", "b"]
    assert cfg.total_steps() == 1  # 1000 tokens / (16 x 128) per step, rounded up


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_layr=3", "model.n_layr"),
        ("train.max_steps=abc", "train.max_steps"),
        ("optim.name=sgd", "optim.name"),
        ("model.bias=maybe", "model.bias"),
        ("train.global_batch_size=12", "train.global_batch_size"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_indivisible_global_batch_for_world_size():
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible"):
        cfg.grad_accum_steps(3)


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "agdlm", "train", "model.n_head=-1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "model.n_head" in out.stderr


def test_help_lists_sections():
    out = subprocess.run([sys.executable, "-m", "agdlm", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for section in ("model:", "optim:", "data:", "train:", "parallel:", "log:"):
        assert section in out.stdout


def test_adamw_schedule_warms_up_then_decays_to_a_tenth():
    from agdlm.optim.adamw import lr_at

    o = load_config("optim/adamw.yaml", ["optim.warmup_steps=10", "optim.lr=1e-3"]).optim
    assert lr_at(0, o, 110) == pytest.approx(1e-3 / 11)
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(110, o, 110) == pytest.approx(1e-4) and lr_at(500, o, 110) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.gain=.nan", "optim.gain"),
        ("optim.grad_clip=.inf", "optim.grad_clip"),
        ("optim.eps=0", "optim.eps"),
        ("optim.lr_decay_steps=0", "optim.lr_decay_steps"),
        ("parallel.replicate=2", "parallel.replicate"),
        ("train.run_name=..", "train.run_name"),
    ],
)
def test_more_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_integer_keys_accept_scientific_notation():
    assert load_config(None, ["train.max_tokens=1e6"]).train.max_tokens == 1_000_000
    with pytest.raises(ConfigError, match="train.max_tokens"):
        load_config(None, ["train.max_tokens=1.5e0"])


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3"])
def test_parallel_configs_load(name):
    cfg = load_config(["gpt2-124m", f"parallel/{name}"])
    assert cfg.parallel.backend in ("ddp", "fsdp2", "deepspeed")
