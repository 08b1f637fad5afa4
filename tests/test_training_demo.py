"""The digits demo pipeline on a reduced setting (200 training images, 2 epochs, 15 held-out images): the Hub-ready
folder, the held-out task of contract 2, its scoring, and loading it without this package. Budget: ~40 s on 2 CPU
cores (the full demo is the README's main job, not a test)."""

from __future__ import annotations

import json

import pytest
from utils import run_without_package

from ml_mamba.training.digits_demo import (
    QUESTIONS,
    DemoSettings,
    answer_questions,
    digit_image,
    is_correct,
    run_demo,
    score,
    split_digits,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "digits"
    settings = DemoSettings(output_dir=str(output_dir), epochs=2, max_train_images=200, max_eval_images=15,
                            pipeline_examples=2)
    return output_dir, run_demo(settings)


def test_split_holds_out_images_never_trained_on():
    images, labels, train, held_out = split_digits()
    assert len(train) + len(held_out) == len(labels) == 1797 and len(held_out) == 359
    assert not set(train) & set(held_out)
    assert digit_image(images[0]).size == (8, 8)


def test_demo_writes_a_hub_ready_folder_and_the_held_out_task(demo):
    output_dir, results = demo
    names = {path.name for path in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_ml_mamba.py", "modeling_ml_mamba.py",
            "processing_ml_mamba.py", "processor_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= names
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_ml_mamba.MLMambaForConditionalGeneration"
    assert config["connector_type"] == "msc" and config["text_config"]["model_type"] == "mamba2"
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and "digits-vqa" in card and "SFTTrainer" in card

    rows = [json.loads(line) for line in (output_dir / "eval" / "digits_vqa.jsonl").read_text().splitlines()]
    assert len(rows) == 15 * len(QUESTIONS) == results["num_examples"]
    assert set(rows[0]) == {"question_id", "image", "question", "answer", "question_type"}
    assert len({row["question_id"] for row in rows}) == len(rows)
    assert all((output_dir / "eval" / row["image"]).is_file() for row in rows)
    assert {row["question_type"] for row in rows} == set(QUESTIONS)

    saved = json.loads((output_dir / "eval" / "demo_results.json").read_text())
    assert saved == {key: results[key] for key in ("overall", "per_type", "num_examples")}
    assert results["steps"] == 2 * (200 * len(QUESTIONS) // 32) and results["train_time_s"] > 0
    assert len(results["pipeline_examples"]) == 2 and all(e["answer"] for e in results["pipeline_examples"])


def test_demo_scoring_follows_the_contract(demo):
    """Accuracy = greedy one-by-one answers under the contract's exact match; the demo's batched answers agree."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    output_dir, results = demo
    rows = [json.loads(line) for line in (output_dir / "eval" / "digits_vqa.jsonl").read_text().splitlines()]
    model = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    images = [Image.open(output_dir / "eval" / row["image"]).convert("RGB") for row in rows]
    one_by_one = answer_questions(model, processor, images, [row["question"] for row in rows], batch_size=1,
                                  progress=False)
    assert score(rows, one_by_one) == {key: results[key] for key in ("overall", "per_type", "num_examples")}
    # Even a 50-step model has learnt which answers each question takes: it reads the question after the image.
    valid = {kind: {answer(d) for d in range(10)} for kind, (_, answer) in QUESTIONS.items()}
    assert sum(p.strip() in valid[row["question_type"]] for row, p in zip(rows, one_by_one)) >= 0.9 * len(rows)
    assert is_correct(" Seven. ", "seven") and not is_correct("seven", "eight")


def test_demo_folder_loads_without_this_package(demo):
    output_dir, results = demo
    row = json.loads((output_dir / "eval" / "digits_vqa.jsonl").read_text().splitlines()[0])
    out = run_without_package(f"""
        from PIL import Image
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(output_dir)!r}, trust_remote_code=True)
        image = Image.open({str(output_dir / "eval" / row["image"])!r})
        messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                                   {{"type": "text", "text": {row["question"]!r}}}]}}]
        print(pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"])
    """, cwd=str(output_dir.parent))
    assert out.strip()
