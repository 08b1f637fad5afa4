"""Training with TRL's SFTTrainer: loss mask, gradient-accumulation normalisation, stages (frozen parts unchanged bit
for bit), LoRA + merge, building from parts offline, bad data, CPU defaults. Budget: ~90 s on 2 CPU cores."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from utils import digit_images, tiny_model

from ml_mamba.training import (
    BadSampleError,
    MLMambaSFTConfig,
    apply_stage,
    build_from_parts,
    build_trainer,
    load_llava_json,
    parse_args,
    prepare_dataset,
    run,
)


def main(argv):
    return run(*parse_args(argv))


ANSWERS = ["It is a zero.", "One.", "It is a two, written with a long tail.", "Three."]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    model, processor = tiny_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def llava_rows(count=8):
    rows = [{"id": f"digit-{i}", "image": f"images/{i}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhich digit is shown?"},
                               {"from": "gpt", "value": ANSWERS[i % 4]}]} for i in range(count)]
    rows.append({"id": "text-only", "conversations": [{"from": "human", "value": "Is four greater than two?"},
                                                      {"from": "gpt", "value": "Yes."}]})
    return rows


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    (folder / "images").mkdir()
    for i, image in enumerate(digit_images(8)):
        image.save(folder / "images" / f"{i}.png")
    (folder / "data.json").write_text(json.dumps(llava_rows()))
    return folder


def args(output_dir, **overrides):
    fields = dict(output_dir=str(output_dir), per_device_train_batch_size=3, learning_rate=3e-3, max_steps=6,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    fields.update(overrides)
    return MLMambaSFTConfig(**fields)


def test_cpu_defaults_are_usable(tmp_path):
    config = MLMambaSFTConfig(output_dir=str(tmp_path))
    assert config.bf16 is False and config.activation_checkpointing is False  # TRL's defaults fail/slow on CPU
    assert config.assistant_only_loss is True and config.max_length is None
    assert MLMambaSFTConfig(output_dir=str(tmp_path), activation_checkpointing=True).activation_checkpointing


def test_llava_json_becomes_messages_and_images(llava_dir):
    dataset, report = load_llava_json(str(llava_dir / "data.json"))
    assert (report.kept, report.image_samples, report.text_only_samples, report.skipped) == (9, 8, 1, {})
    sample = dataset[0]
    assert sample["messages"][0]["content"][0]["type"] == "image"  # the marker became an image item, in place
    assert sample["messages"][0]["content"][1] == {"type": "text", "text": "Which digit is shown?"}
    assert sample["images"][0].size == (32, 32)
    assert dataset[8]["images"] == [] and dataset[8]["messages"][1]["content"][0]["text"] == "Yes."


def test_loss_only_on_assistant_tokens(base_dir, llava_dir, tmp_path):
    """Image placeholders and prompt tokens get label -100, and TRL's loss equals cross-entropy on the answers."""
    model, processor = tiny_model()
    dataset, _ = load_llava_json(str(llava_dir / "data.json"))
    trainer = build_trainer(model, processor, args(tmp_path), dataset)
    batch = trainer.data_collator([dataset[2], dataset[8], dataset[1]])  # an image sample, text-only, image sample
    labels, ids = batch["labels"], batch["input_ids"]
    assert batch["pixel_values"].shape[0] == 2  # the text-only sample brings no image
    assert (labels[ids == processor.image_token_id] == -100).all()
    trained = [processor.tokenizer.decode(row[row != -100]) for row in labels]
    assert trained == [ANSWERS[2] + "<|endoftext|>", "Yes.<|endoftext|>", ANSWERS[1] + "<|endoftext|>"]

    model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_fused_head_projects_only_labelled_positions_on_cpu(llava_dir, tmp_path, monkeypatch):
    """`build_trainer` makes TRL's fused LM head project only the labelled positions on CPU
    (`score_labelled_positions_on_cpu`; TRL projects every position off Triton devices): only those rows reach the
    head, and the loss and every gradient equal TRL's every-position projection."""
    from trl.trainer import utils as trl_utils

    model, processor = tiny_model()
    dataset, _ = load_llava_json(str(llava_dir / "data.json"))
    trainer = build_trainer(model, processor, args(tmp_path), dataset)
    assert getattr(trl_utils._use_triton, "_ml_mamba_scores_labelled_positions_on_cpu", False)
    batch = trainer.data_collator([dataset[2], dataset[8], dataset[1]])
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: projected.append(hidden.shape[0]) or apply(hidden, *rest))
    model.train()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert projected == [labelled] and labelled < batch["labels"][:, 1:].numel() // 4
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # TRL's own choice on CPU
    every_loss, every_grads = loss_and_grads()
    assert projected[-1] == batch["labels"][:, 1:].numel()
    torch.testing.assert_close(loss, every_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == every_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], every_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _one_sgd_step(dataset, tmp_path, batch_size, accumulation):
    model, processor = tiny_model()
    model.train()
    trainer = build_trainer(model, processor, args(tmp_path, per_device_train_batch_size=batch_size,
                                                   gradient_accumulation_steps=accumulation, max_steps=1,
                                                   optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                                                   lr_scheduler_type="constant", weight_decay=0.0), dataset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    return {k: model.state_dict()[k] - before[k] for k in before}, model


def test_gradient_accumulation_normalises_over_all_label_tokens(llava_dir, tmp_path):
    """bs=1 x 2 accumulation steps == bs=2: the loss is divided by the label tokens of both micro-batches
    (Trainer's `num_items_in_batch`, used by TRL's loss), not averaged per micro-batch."""
    dataset, _ = load_llava_json(str(llava_dir / "data.json"))
    pair = dataset.select([1, 2])  # 3 and 12 answer tokens: a per-micro-batch mean would weight them differently
    full, model = _one_sgd_step(pair, tmp_path / "a", batch_size=2, accumulation=1)
    accumulated, _ = _one_sgd_step(pair, tmp_path / "b", batch_size=1, accumulation=2)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)

    # The test can tell the two normalisations apart: the mean of per-sample means moves the weights differently.
    fresh, processor = tiny_model()
    fresh.train()
    collator = build_trainer(fresh, processor, args(tmp_path / "c"), pair).data_collator
    naive = 0
    for index in range(2):
        batch = collator([pair[index]])
        naive = naive + fresh(**batch).loss / 2
    naive.backward()
    name = "model.connector.input_proj.weight"
    assert not torch.allclose(-fresh.get_parameter(name).grad, full[name], rtol=1e-2, atol=1e-6)


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return [k for k in keys if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_sft_steps_train_only_the_stage_parts(base_dir, llava_dir, tmp_path, stage):
    out = tmp_path / stage
    summary = main(["--model_name_or_path", base_dir, "--data_path", str(llava_dir / "data.json"), "--stage", stage,
                    "--output_dir", str(out), "--max_steps", "12", "--per_device_train_batch_size", "3",
                    "--learning_rate", "5e-3", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm",
                    "true", "--report_to", "none"])
    losses = [entry["loss"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 12
    if stage == "finetune":  # (aligning a connector to a random LM barely moves the loss in 12 steps)
        assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # the loss falls
    before, after = load_file(os.path.join(base_dir, "model.safetensors")), load_file(out / "model.safetensors")
    assert _changed(before, after, "model.vision_tower.") == []  # frozen: bit for bit
    assert len(_changed(before, after, "model.connector.")) == len([k for k in before if "connector." in k])
    lm_changed = _changed(before, after, "model.language_model.")
    assert (lm_changed == []) if stage == "align" else len(lm_changed) > 10
    assert summary["steps"] == 12 and (out / "README.md").is_file()


def test_yaml_recipe_and_lora_merge(base_dir, llava_dir, tmp_path):
    """LoRA on the LM mixers' in_proj + the connector in full; the merged checkpoint (plain safetensors, remote code,
    processor) loads through the Auto classes and gives the adapter model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_ml_mamba import MLMambaForConditionalGeneration

    out = tmp_path / "lora"
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"model_name_or_path: {base_dir}\ndata_path: {llava_dir / 'data.json'}\nstage: finetune\n"
                      f"use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nmerge_lora: true\n"
                      f"output_dir: {out}\nmax_steps: 6\nper_device_train_batch_size: 3\nlearning_rate: 5.0e-3\n"
                      f"save_strategy: 'no'\nreport_to: none\ndisable_tqdm: true\n")
    main(["--config", str(recipe)])
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["connector"]
    adapter = load_file(out / "adapter_model.safetensors")
    lora_keys = [k for k in adapter if "lora_" in k]
    assert lora_keys and all("language_model" in k and "mixer.in_proj" in k for k in lora_keys)
    assert not any("lm_head" in k for k in adapter) and all("connector" in k for k in adapter if "lora_" not in k)

    merged_files = load_file(out / "merged" / "model.safetensors")
    assert not any("lora" in k or "modules_to_save" in k for k in merged_files)
    before = load_file(os.path.join(base_dir, "model.safetensors"))
    assert _changed(before, merged_files, "model.vision_tower.") == []
    assert _changed(before, merged_files, "model.connector.")
    assert len(_changed(before, merged_files, "model.language_model.")) == 2  # the two in_proj weights

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out / "merged", trust_remote_code=True)
    with_adapter = PeftModel.from_pretrained(MLMambaForConditionalGeneration.from_pretrained(base_dir), out).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": digit_images(1, 5)[0]},
                                             {"type": "text", "text": "Which digit is shown?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter(**inputs).logits, rtol=1e-4, atol=1e-5)
    assert "---" in (out / "merged" / "README.md").read_text()

    # The same merge from the adapter folder alone (its config names the base), as `ml-mamba-merge-lora` does it.
    from ml_mamba.training.merge import main as merge_main

    merge_main(["--adapter", str(out), "--output_dir", str(tmp_path / "merged-again")])
    again = load_file(tmp_path / "merged-again" / "model.safetensors")
    assert all(torch.equal(again[k], merged_files[k]) for k in merged_files)
    assert (tmp_path / "merged-again" / "processor_config.json").is_file()


def test_preset_with_a_local_tokenizer(tmp_path):
    from utils import tokenizer

    from ml_mamba.training import ModelArguments, load_model_and_processor

    tokenizer().save_pretrained(tmp_path / "tok")
    model_args = ModelArguments(preset="tiny", tokenizer_name_or_path=str(tmp_path / "tok"))
    model, processor = load_model_and_processor(model_args)
    assert model.config.image_token_id == processor.image_token_id
    assert model.config.text_config.vocab_size >= len(processor.tokenizer) and model.config.connector_type == "msc"
    with pytest.raises(ValueError, match="exactly one model source"):
        ModelArguments(preset="tiny", model_name_or_path="x")
    with pytest.raises(ValueError, match="needs --tokenizer_name_or_path"):
        load_model_and_processor(ModelArguments(preset="tiny"))


def test_lora_on_connector_mixers_too(base_dir, llava_dir, tmp_path):
    from ml_mamba.training import ModelArguments, load_model_and_processor, lora_config

    model_args = ModelArguments(model_name_or_path=base_dir, use_peft=True, lora_r=4,
                                lora_scope="language_model+connector")
    model, _ = load_model_and_processor(model_args)
    config = lora_config(model_args, model)
    assert "model.connector.blocks.0.mlp" in config.modules_to_save and "model.connector.input_proj" in \
        config.modules_to_save and not any("mixer" in name for name in config.modules_to_save)
    from peft import get_peft_model

    wrapped = get_peft_model(model, config)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("connector.blocks.0.mixer.in_proj.lora_A" in n for n in trainable)
    assert any("language_model.layers.1.mixer.in_proj.lora_B" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    with pytest.raises(ValueError, match="out_proj"):
        ModelArguments(model_name_or_path=base_dir, use_peft=True, lora_target_modules=[".*mixer.out_proj"])


def test_bad_llava_data_is_named_or_skipped(llava_dir, tmp_path):
    rows = llava_rows(3)
    rows += [
        {"id": "missing-file", "image": "images/nope.png",
         "conversations": [{"from": "human", "value": "<image>\nDigit?"}, {"from": "gpt", "value": "Two."}]},
        {"id": "empty", "image": "images/0.png", "conversations": []},
        {"id": "two-markers", "image": "images/1.png",
         "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hello?"}]},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Hi"}]},
    ]
    path = llava_dir / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(BadSampleError) as error:
        load_llava_json(str(path))
    message = str(error.value)
    assert "5 of 9 samples" in message and "--bad_samples skip" in message
    for expected in ["'missing-file'): image file not found", "'empty'): empty or missing 'conversations'",
                     "'two-markers'): 2 <image> marker(s) but only 1 image(s)", "'no-answer'): no assistant answer",
                     "'bad-role'): turn 0 has unknown role 'robot'"]:
        assert expected in message

    dataset, report = load_llava_json(str(path), bad_samples="skip")
    assert len(dataset) == report.kept == 4 and len(report.skipped) == 5
    assert "5 skipped" in report.summary()


def test_bad_samples_fail_before_training_from_the_cli(base_dir, llava_dir, tmp_path):
    rows = llava_rows(2) + [{"id": "ghost", "image": "images/missing.png", "conversations": [
        {"from": "human", "value": "<image>\nDigit?"}, {"from": "gpt", "value": "Two."}]}]
    path = llava_dir / "ghost.json"
    path.write_text(json.dumps(rows))
    common = ["--model_name_or_path", base_dir, "--data_path", str(path), "--max_steps", "1",
              "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    with pytest.raises(BadSampleError, match="'ghost'\\): image file not found"):
        main(common + ["--output_dir", str(tmp_path / "a")])
    assert not (tmp_path / "a" / "model.safetensors").exists()
    summary = main(common + ["--output_dir", str(tmp_path / "b"), "--bad_samples", "skip"])
    assert summary["data"].kept == 3 and list(summary["data"].skipped) == ["sample 3 (id='ghost')"]


def test_hf_dataset_formats_are_checked(tmp_path):
    from datasets import Dataset

    images = digit_images(3)

    def turn(role, *items):
        return {"role": role, "content": [{"type": "image", "text": None} if item is None else
                                          {"type": "text", "text": item} for item in items]}

    answer = turn("assistant", "Zero.")
    dataset = Dataset.from_dict({
        "messages": [[turn("user", None, "Which digit?"), answer],
                     [turn("user", None, None, "Same?"), answer],
                     [turn("user", "Text only."), answer]],
        "images": [[images[0]], [images[1]], []]})
    with pytest.raises(BadSampleError, match="sample 1: 2 image placeholder\\(s\\) but 1 image\\(s\\)"):
        prepare_dataset(dataset)
    kept, report = prepare_dataset(dataset, bad_samples="skip")
    assert (report.kept, report.image_samples, report.text_only_samples) == (2, 1, 1)
    assert kept[0]["images"][0].size == images[0].size

    # String contents: TRL puts the images before the first user message, so only the count can be wrong.
    strings = Dataset.from_dict({"messages": [[{"role": "user", "content": "Which digit?"},
                                               {"role": "assistant", "content": "Zero."}]] * 2,
                                 "image": [images[0], None]})
    kept, report = prepare_dataset(strings)
    assert kept.column_names == ["messages", "images"] and (report.image_samples, report.text_only_samples) == (1, 1)
    empty = Dataset.from_dict({"messages": [[{"role": "user", "content": "Hi"}]], "images": [[]]})
    with pytest.raises(BadSampleError, match="no assistant answer"):
        prepare_dataset(empty)

    llava = Dataset.from_dict({"image": [images[0], None], "conversations": [
        [{"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "Zero."}],
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]]})
    converted, report = prepare_dataset(llava)
    assert converted.column_names == ["messages", "images"] and report.image_samples == 1
    assert converted[0]["messages"][0]["content"][0]["type"] == "image"


def test_build_from_pretrained_parts_offline(tmp_path, monkeypatch):
    """Vision towers + Mamba-2 LM from local folders (the Hub-id code path, offline): weights carried over exactly,
    connector random, and SFTTrainer trains it."""
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        Mamba2Config,
        Mamba2ForCausalLM,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )
    from utils import DINOV2_REG, SIGLIP, text_config, tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(vision_config={k: v for k, v in SIGLIP.items() if k != "model_type"},
                                      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, vocab_size=99)))
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{k: v for k, v in DINOV2_REG.items()
                                                                  if k != "model_type"}))
    lm = Mamba2ForCausalLM(Mamba2Config(**{k: v for k, v in text_config("mamba2", vocab_size=296).items()
                                           if k != "model_type"}))
    tok = tokenizer()
    for name, part in {"siglip": siglip, "dino": dino, "lm": lm}.items():
        part.save_pretrained(tmp_path / name)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "dino")
    tok.save_pretrained(tmp_path / "lm")

    model, processor = build_from_parts([str(tmp_path / "dino"), str(tmp_path / "siglip")], str(tmp_path / "lm"),
                                        connector_type="msc", image_size=32, connector_num_blocks=1,
                                        connector_chunk_size=8)
    state = model.state_dict()
    for key, value in dino.state_dict().items():
        assert torch.equal(state[f"model.vision_tower.first_tower.{key}"], value)
    for key, value in siglip.vision_model.state_dict().items():
        assert torch.equal(state[f"model.vision_tower.second_tower.{key}"], value)
    for key, value in lm.backbone.state_dict().items():  # the embeddings grew by the tokenizer's extra tokens
        assert torch.equal(state[f"model.language_model.{key}"][:len(value)], value), key
    assert model.config.text_config.vocab_size == state["lm_head.weight"].shape[0] == 304 >= len(processor.tokenizer)
    assert model.config.image_token_id == processor.image_token_id
    assert processor.image_normalizations[0]["mean"] == [0.485, 0.456, 0.406]
    assert all(torch.isfinite(p).all() and p.std() > 0 for n, p in model.named_parameters() if "connector" in n
               and n.endswith("weight") and p.dim() == 2)

    from datasets import Dataset

    from ml_mamba.training.digits_demo import chat

    data = Dataset.from_dict({"messages": [chat("Which digit?", "Zero.")] * 4,
                              "images": [[image] for image in digit_images(4)]})
    apply_stage(model, "align")
    trainer = build_trainer(model, processor, args(tmp_path / "out", max_steps=2), data)
    trainer.train()
    assert trainer.state.global_step == 2
