"""A non-finite gradient on one rank under DDP, FSDP2 and DeepSpeed ZeRO-2: AGD's reduced G
is not finite on every rank, so every rank skips the step with its weights bitwise
unchanged (no host sync decides it: a torch.where on the step scale), counts it, and moves
again on the next good step. Under ZeRO-2 DeepSpeed's own overflow check skips the step
before AGD runs (engine.skipped_steps counts it) (tests/nonfinite_worker.py runs the real 2-rank gloo group)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory, agdlm_cache):
    out = tmp_path_factory.mktemp("nonfinite") / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "AGDLM_CACHE": str(agdlm_cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "nonfinite_worker.py"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["ddp", "fsdp2", "zero2"])
def test_inf_on_one_rank_skips_the_step_on_every_rank(results, case):
    for r in results[case]:
        assert r["pieces"] > 0, r
        assert r["unchanged"], r
        if case == "zero2":  # DeepSpeed's own overflow check (it runs in fp32 too) skips before AGD is called
            assert r["engine_skipped"] == 1 and r["skips_after_bad"] == 0, r
        else:
            assert r["skips_after_bad"] == 1 and r["skipped_total"] == 1, r
        assert r["moved_after_good"] and r["finite"] and r["skips_after_good"] == 0, r
