"""TRL's own command line on a saved ML-Mamba folder, as the README documents it: `trl sft --trust_remote_code`, full
fine-tuning and LoRA on the LM's mixers (a regex target: through TRL's CLI a bare module name matches nothing).
Budget: ~30 s (two short runs in fresh processes)."""

import os
import subprocess

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from utils import digit_images, tiny_model

LORA_TARGET = r".*language_model.*\.in_proj"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl-cli")
    model, processor = tiny_model("mlp")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    answers = ["Zero.", "One.", "Two.", "Three."]
    rows = {"messages": [], "images": []}
    for index, image in enumerate(digit_images(8)):
        rows["messages"].append([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is shown?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[index % 4]}]}])
        rows["images"].append([image])
    dataset = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    (folder / "data").mkdir()
    dataset.to_parquet(str(folder / "data" / "train.parquet"))
    return folder


def trl_sft(workspace, output_dir, *extra):
    command = ["trl", "sft", "--model_name_or_path", "model", "--trust_remote_code", "--dataset_name", "data",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
               "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
               "--save_strategy", "no", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_trl_sft_full_fine_tuning(workspace):
    trl_sft(workspace, workspace / "full", "--attn_implementation", "sdpa")
    base = load_file(workspace / "model" / "model.safetensors")
    tuned = load_file(workspace / "full" / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base if "language_model" in k)
    model = AutoModelForImageTextToText.from_pretrained(workspace / "full", trust_remote_code=True)
    assert type(model).__name__ == "MLMambaForConditionalGeneration"


def test_trl_sft_lora_with_a_regex_target(workspace):
    from peft import PeftModel

    trl_sft(workspace, workspace / "lora", "--use_peft", "--lora_r", "4", "--lora_target_modules", LORA_TARGET)
    adapter = load_file(workspace / "lora" / "adapter_model.safetensors")
    lora_keys = [k for k in adapter if "lora_A" in k]
    assert lora_keys and all("language_model" in k and "in_proj" in k for k in lora_keys)
    base = AutoModelForImageTextToText.from_pretrained(workspace / "model", trust_remote_code=True)
    tuned = PeftModel.from_pretrained(base, workspace / "lora")
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)  # it trained
