"""A non-finite gradient on one rank under DDP, FSDP2 and DeepSpeed ZeRO-2: AGD's reduced G
is not finite on every rank, so every rank skips the step with its weights bitwise
unchanged (no host sync decides it: a torch.where on the step scale), counts it, and moves
again on the next good step (tests/nonfinite_worker.py runs the real 2-rank gloo group)."""


import pytest

from gloo_workers import run_worker_script



@pytest.fixture(scope="module")
def results(tmp_path_factory, agdlm_cache):
    out = tmp_path_factory.mktemp("nonfinite") / "results.json"
    return run_worker_script("nonfinite_worker.py", out, cache=agdlm_cache)


@pytest.mark.parametrize("case", ["ddp", "fsdp2", "zero2"])
def test_inf_on_one_rank_skips_the_step_on_every_rank(results, case):
    for r in results[case]:
        assert r["pieces"] > 0, r
        assert r["unchanged"], r
        # AGD's own skip; on ZeRO-2 DeepSpeed's overflow check is off for AGD (compute_grad_norm: false)
        assert r["skips_after_bad"] == 1 and r["skipped_total"] == 1, r
        assert r["engine_skipped"] in (None, 0), r
        assert r["moved_after_good"] and r["finite"] and r["skips_after_good"] == 0, r
