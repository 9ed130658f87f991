import os

import pytest
import torch

# Tests share the 2 CI cores with the multi-process tests; one intra-op thread each keeps
# them from oversubscribing and keeps timings steady.
torch.set_num_threads(1)

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.global_batch_size=8", "train.micro_batch_size=4", "data.val_fraction=0.1",
    "train.eval_batches=2", "log.interval=1",
]  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process cases of a minute or more (CI runs them; "
                                       "deselect locally with -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def agdlm_cache(tmp_path_factory):
    """One demo shard per test session, outside the user's cache."""
    path = tmp_path_factory.mktemp("agdlm_cache")
    os.environ["AGDLM_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"train.out_dir={tmp_path / 'runs'}"]


@pytest.fixture(params=["flat-buffer", "per-tensor"])
def small_piece_path(request, monkeypatch):
    """AGD checks run twice: small pieces through the shared flat buffer (the CPU default at a
    test model's sizes) and every piece through the per-tensor update that large tensors take."""
    if request.param == "per-tensor":
        from agdlm.optim import agd

        monkeypatch.setitem(agd.FLAT_MAX_NUMEL, "cpu", 1)
