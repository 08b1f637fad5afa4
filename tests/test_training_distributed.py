"""`accelerate launch` with 2 CPU processes (gloo), and a run killed with SIGKILL then resumed. Budget: ~60 s on 2 CPU
cores (most of it is starting Python processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from utils import digit_images, tiny_model

from ml_mamba.training import accelerate_config, parse_args, run

# Runs `ml_mamba.training.run` with two test hooks: every process dumps its final weights, and a run can be told to
# hang right after writing a checkpoint (so the test can SIGKILL it mid-way, as a crash would).
LAUNCHED = """
import os, sys, time
import torch
from transformers import TrainerCallback
from ml_mamba.training import parse_args, run

class Hooks(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("HANG_AFTER_STEP", -1)):
            open(os.path.join(args.output_dir, "HANGING"), "w").close()
            time.sleep(600)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        torch.save(model.state_dict(), os.path.join(args.output_dir, f"rank{args.process_index}.pt"))

run(*parse_args(sys.argv[1:]), callbacks=[Hooks()])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    model, processor = tiny_model()
    model.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    (folder / "images").mkdir()
    rows = []
    for i, image in enumerate(digit_images(16)):
        image.save(folder / "images" / f"{i}.png")
        answer = ["It is a zero.", "One.", "Two, I think.", "Three."][i % 4]
        rows.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich digit is shown?"}, {"from": "gpt", "value": answer}]})
    (folder / "data.json").write_text(json.dumps(rows))
    (folder / "launched.py").write_text(LAUNCHED)
    return folder


def common_args(folder, output_dir, batch_size, steps=4):
    return ["--model_name_or_path", str(folder / "base"), "--data_path", str(folder / "data.json"),
            "--output_dir", str(output_dir), "--max_steps", str(steps), "--per_device_train_batch_size",
            str(batch_size), "--learning_rate", "5e-3", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--seed", "0"]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


def test_two_cpu_processes_end_with_identical_weights(setup, tmp_path):
    """DDP over gloo with the shipped config: both ranks hold the same weights after training, and they equal a
    one-process run on the same global batches (the loss is normalised over the label tokens of all ranks)."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config("ddp"),
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(setup / "launched.py"), *common_args(setup, out, batch_size=2), "--save_strategy", "no"]
    launched = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    base = load_file(setup / "base" / "model.safetensors")
    assert any(not torch.equal(rank0[k], base[k]) for k in base)  # it trained
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    single = run(*parse_args(common_args(setup, tmp_path / "single", batch_size=4) + ["--save_strategy", "no"]))
    assert single["steps"] == 4
    reference = load_file(tmp_path / "single" / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5)


def _losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    args = ["--save_steps", "2", "--save_total_limit", "3"]
    straight = tmp_path / "straight"
    run(*parse_args(common_args(setup, straight, batch_size=3, steps=8) + args))

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(setup / "launched.py"),
                                *common_args(setup, killed, batch_size=3, steps=8), *args],
                               env=dict(env(), HANG_AFTER_STEP="4"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "HANGING").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 4"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / "model.safetensors").exists()

    summary = run(*parse_args(common_args(setup, killed, batch_size=3, steps=8) + args + ["--resume", "true"]))
    assert summary["steps"] == 8 and summary["resumed_from"] == str(killed / "checkpoint-4")
    resumed_losses, straight_losses = _losses(killed), _losses(straight)
    assert len(resumed_losses) == 8
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-4, abs=1e-5)
    expected, got = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_full_stage_with_activation_checkpointing_under_ddp(setup, tmp_path):
    """`--stage full` with activation checkpointing under DDP (where the Trainer turns find_unused_parameters off):
    both ranks end identical, the vision tower trained, and its parameters that never reach the features (the layers
    after `vision_feature_layer`, the final norm; frozen by `apply_stage`) are untouched."""
    out = tmp_path / "full"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config("ddp"),
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(setup / "launched.py"), *common_args(setup, out, batch_size=2, steps=3), "--save_strategy", "no",
               "--stage", "full", "--activation_checkpointing", "true"]
    launched = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    base = load_file(setup / "base" / "model.safetensors")
    changed = {k for k in base if not torch.equal(rank0[k], base[k])}
    assert any(k.startswith("model.vision_tower.") for k in changed)
    assert not any(".encoder.layers.1." in k or "post_layernorm" in k for k in changed)  # frozen: never used
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
