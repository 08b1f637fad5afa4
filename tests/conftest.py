"""Shared fixtures."""

import os
import subprocess
import sys

import pytest

# The compatibility subset (`pytest -m compat`), which CI also runs on the oldest transformers the package allows:
# model, processor, config, generate with a cache, the fast path against transformers' reference path, save + load
# through `trust_remote_code` in a fresh process, LoRA training steps, and the internal-imports rule.
COMPAT_MODULES = {
    "test_compat.py",
    "test_decode.py",
    "test_conventions.py",
    "test_trl_cli.py",
    "test_config.py",
    "test_modeling.py",
    "test_processor.py",
    "test_generation.py",
    "test_fast_path.py",
    "test_hub_roundtrip.py",
    "test_training.py",
    "test_chat_state.py",
    "test_video.py",
    "test_packing.py",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in COMPAT_MODULES and "trained_demo" not in item.fixturenames:  # no 70 s demo there
            item.add_marker(pytest.mark.compat)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """The README's main job, run once per session: the digits demo trained from scratch (about 2 minutes on 2
    CPU cores). Set ML_MAMBA_DEMO_DIR to reuse a folder the demo already wrote."""
    existing = os.environ.get("ML_MAMBA_DEMO_DIR")
    if existing:
        return existing
    output_dir = tmp_path_factory.mktemp("digits-demo")
    result = subprocess.run([sys.executable, "-m", "ml_mamba.training.digits_demo", "--output-dir", str(output_dir)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise AssertionError(f"the digits demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    (output_dir / "demo_stdout.txt").write_text(result.stdout)
    return str(output_dir)
