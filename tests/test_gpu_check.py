"""The GPU check script (`benchmarks/gpu_check.sh`, issue 14) in its CPU dry run, so it cannot rot between GPU runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_SITE=str(tmp_path / "site"))
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["steps"]) == ["environment", "equality", "training", "speed"]
    assert all(step["ok"] for step in results["steps"].values())
    checks = {(c["check"], c["dtype"]) for c in results["steps"]["equality"]["checks"]}
    for name in ("SSD scan vs sequential recurrence", "scan connector mixer (CSM)", "Mamba-2 (ML-Mamba) forward",
                 "Mamba-1 (Cobra) generate: graph step vs eager", "Mamba-2 (ML-Mamba) left-padded batch vs one by one"):
        assert {(name, "float32"), (name, "bfloat16")} <= checks
    assert {run["run"] for run in results["steps"]["training"]["runs"]} == {"full", "LoRA"}
    speed = results["steps"]["speed"]
    assert {row["arm"] for row in speed["end_to_end"]} == {"ml-mamba", "llava", "cobra"}
    assert all(row["b1_tok_s"] > 0 and row["b8_tok_s"] > 0 for row in speed["points"])
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## speed: ok" in markdown and "| goal | measured | met |" in markdown


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    def broken(device, dry_run):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gpu_check, "step_environment", broken)
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "environment", "speed"])
    assert status == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["steps"]["environment"]["ok"]
    assert "no kernel image" in results["steps"]["environment"]["error"]
    assert results["steps"]["speed"]["ok"]
    assert "no kernel image" in (tmp_path / "results.md").read_text()


def test_without_a_gpu_the_real_run_says_how_to_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--dry-run" in run.stderr
