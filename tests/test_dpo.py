"""Preference tuning with TRL's `DPOTrainer` on our models, offline on the digits data: image + question, chosen = the
right answer, rejected = a wrong one. The preference margin grows and the chosen answers' accuracy on held-out
images does not fall."""

import json
import os

import torch
from PIL import Image

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _held_out(trained_demo, count=96):
    rows = [json.loads(line) for line in open(os.path.join(trained_demo, "eval", "digits_vqa.jsonl"))]
    rows = [row for row in rows if row["question_type"] == "digit"][:count]
    images = [Image.open(os.path.join(trained_demo, "eval", row["image"])).convert("RGB") for row in rows]
    return rows, images


def _accuracy(model, processor, rows, images):
    from ml_mamba.training.digits_demo import answer_questions, is_correct

    answers = answer_questions(model, processor, images, [row["question"] for row in rows], progress=False)
    return sum(is_correct(a, row["answer"]) for a, row in zip(answers, rows)) / len(rows)


def test_dpo_on_digits_grows_the_margin_and_keeps_accuracy(trained_demo, tmp_path):
    from datasets import Dataset, Image as ImageFeature, List
    from sklearn.datasets import load_digits
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from ml_mamba.training.digits_demo import digit_image

    model = AutoModelForImageTextToText.from_pretrained(trained_demo)
    processor = AutoProcessor.from_pretrained(trained_demo)
    rows, images = _held_out(trained_demo)
    before = _accuracy(model, processor, rows, images)

    digits = load_digits()
    samples = []
    for index in range(64):  # training images of the demo's split are not needed: DPO only sharpens preferences
        label = int(digits.target[index])
        samples.append({
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "Which digit is shown?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": NUMBER_WORDS[label]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text",
                                                            "text": NUMBER_WORDS[(label + 3) % 10]}]}],
            "images": [digit_image(digits.images[index])]})
    dataset = Dataset.from_list(samples).cast_column("images", List(ImageFeature()))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-4,
                     beta=0.1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                     seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(margins) == 12
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.015, margins  # the preference margin grows (from 0)
    after = _accuracy(trainer.model.eval(), processor, rows, images)
    # The chosen answers' accuracy does not fall by more than one held-out question: float-level differences flip
    # a borderline answer (TRL's labelled-only head, which the demo's `build_trainer` switches on process-wide,
    # gives 0.9896 -> 0.9792 here, its every-position head 0.9896 -> 0.9896; their gradients agree to 1e-5).
    assert after >= before - 1 / len(rows) - 1e-9, (before, after)
    assert torch.isfinite(torch.tensor(margins)).all()
