"""The offline demo: train a small ML-Mamba from scratch to answer questions about handwritten digits, on a CPU.

    pip install -e ".[train]" && ml-mamba-demo            # or: python -m ml_mamba.training.digits_demo
    ml-mamba-demo --task video                            # the video demo (training/video_demo.py)

scikit-learn's 1,797 8x8 handwritten digits become visual question answering with four question types that can
only be answered by reading the question *after* the image (the model folds the image into its state first):
"Which digit is shown?", "Is the digit even or odd?", "Is it greater than four?", "What is the digit plus one?".
A fifth of the images is held out and never seen in training.

The model is an ML-Mamba in miniature (SigLIP-style vision tower -> MSC connector with a bidirectional Mamba-2 scan ->
Mamba-2 LM, about 0.26M parameters) with a byte-level BPE tokenizer trained on the spot, and it is trained by TRL's
`SFTTrainer` through the same code path as ``ml-mamba-train`` (loss on the answers only). The demo then saves a
Hub-ready folder (safetensors, remote code, processor, model card, the held-out task of the evaluation harness),
reloads it with ``AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)``, scores every held-out
question by greedy generation, and answers a few through ``pipeline("image-text-to-text")``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .allocator import keep_freed_memory

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# question_type -> (question, answer for a digit)
QUESTIONS = {
    "digit": ("Which digit is shown?", lambda d: NUMBER_WORDS[d]),
    "parity": ("Is the digit even or odd?", lambda d: "even" if d % 2 == 0 else "odd"),
    "greater_than_four": ("Is it greater than four?", lambda d: "yes" if d > 4 else "no"),
    "plus_one": ("What is the digit plus one?", lambda d: str(d + 1)),
}


@dataclass
class DemoSettings:
    """Everything that decides the demo's result (the defaults are the README's run)."""

    output_dir: str = "outputs/digits-demo"
    epochs: float = 8.0
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    # The tensors are tiny: one compute thread beats two (no OpenMP hand-offs, and no collapse when another program
    # uses the second core), which then runs the data-loading worker.
    threads: int = 1
    dataloader_workers: int = 1
    held_out_fraction: float = 0.2
    seed: int = 0
    hidden_size: int = 64
    patch_size: int = 4
    max_train_images: int | None = None
    max_eval_images: int | None = None
    lora: bool = False
    pipeline_examples: int = 4


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 RGB image of a scikit-learn digit (values 0..16)."""
    return Image.fromarray(np.round(pixels / 16.0 * 255).astype(np.uint8), mode="L").convert("RGB")


def split_digits(held_out_fraction: float = 0.2, seed: int = 0):
    """``(images, labels, train_indices, held_out_indices)``: a fixed random split of the 1,797 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    held_out = int(round(len(order) * held_out_fraction))
    return digits.images, digits.target, np.sort(order[held_out:]), np.sort(order[:held_out])


def chat(question: str, answer: str | None = None) -> list[dict]:
    """The demo's conversation: the image first, then the question (and the answer, for training)."""
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def training_dataset(images, labels, indices, seed: int):
    """A `datasets.Dataset` in TRL's format: one sample per (image, question type), shuffled."""
    from datasets import Dataset

    rows = []
    for index in indices:
        image = digit_image(images[index])
        for question, answer in QUESTIONS.values():
            rows.append({"messages": chat(question, answer(int(labels[index]))), "images": [image]})
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


def demo_tokenizer():
    """A byte-level BPE trained on the questions and answers (nothing can be downloaded)."""
    from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer

    answers = [answer(d) for _, answer in QUESTIONS.values() for d in range(10)]
    corpus = [question for question, _ in QUESTIONS.values()] + answers + [" ".join(answers)]
    return train_bpe_tokenizer(corpus * 20, vocab_size=320)


def demo_model(tokenizer, settings: DemoSettings):
    """(model, processor): a small ML-Mamba with the published layout (MSC connector, Mamba-2 LM), random weights."""
    from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration

    from .models import processor_for

    hidden = settings.hidden_size
    config = MLMambaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, image_size=8,
                           patch_size=settings.patch_size),
        text_config=dict(model_type="mamba2", hidden_size=hidden, num_hidden_layers=2, num_heads=2 * hidden // 16,
                         head_dim=16, state_size=16, n_groups=1, expand=2, chunk_size=64,
                         vocab_size=-(-len(tokenizer) // 8) * 8, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=0, eos_token_id=0),
        connector_type="msc", connector_scan="bidirectional", connector_num_blocks=1, connector_chunk_size=16,
        image_size=8, vision_feature_layer=-1,
        # Small layers need a larger init than the 0.02 of billion-parameter models, or the image features start
        # ~50x weaker than the word embeddings and the model learns to ignore the image.
        initializer_range=0.1,
    )
    processor = processor_for(config, tokenizer)
    config.image_token_id = processor.image_token_id
    torch.manual_seed(settings.seed)
    return MLMambaForConditionalGeneration(config), processor


def write_held_out_task(output_dir: str, images, labels, indices) -> list[dict]:
    """Contract 2: ``eval/digits_vqa.jsonl`` + ``eval/images/*.png`` (what `ml-mamba-eval` scores as digits-vqa)."""
    image_dir = os.path.join(output_dir, "eval", "images")
    os.makedirs(image_dir, exist_ok=True)
    rows = []
    for index in indices:
        name = f"digit_{index:04d}.png"
        digit_image(images[index]).save(os.path.join(image_dir, name))
        for question_type, (question, answer) in QUESTIONS.items():
            rows.append({"question_id": f"{index:04d}-{question_type}", "image": f"images/{name}",
                         "question": question, "answer": answer(int(labels[index])), "question_type": question_type})
    with open(os.path.join(output_dir, "eval", "digits_vqa.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def is_correct(prediction: str, answer: str) -> bool:
    """The contract's exact match: case-insensitive, surrounding spaces and one final period ignored."""
    return prediction.strip().lower().rstrip(".") == answer.strip().lower().rstrip(".")


@torch.no_grad()
def answer_questions(model, processor, images: list, questions: list[str], batch_size: int = 240,
                     progress: bool = True) -> list[str]:
    """Greedy answers (``max_new_tokens=8``) to ``questions`` about ``images``, in left-padded batches."""
    from tqdm.auto import tqdm

    model.eval()
    predictions = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="Answering held-out questions", disable=not progress):
        texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False)
                 for q in questions[start:start + batch_size]]
        batch_images = [[image] for image in images[start:start + batch_size]]
        inputs = processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        predictions += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return predictions


def score(rows: list[dict], predictions: list[str]) -> dict:
    """``{"overall", "per_type", "num_examples"}`` as contract 2's ``demo_results.json``."""
    per_type: dict[str, list[bool]] = {}
    for row, prediction in zip(rows, predictions):
        per_type.setdefault(row["question_type"], []).append(is_correct(prediction, row["answer"]))
    every = [ok for oks in per_type.values() for ok in oks]
    return {"overall": sum(every) / len(every),
            "per_type": {kind: sum(oks) / len(oks) for kind, oks in per_type.items()},
            "num_examples": len(every)}


@contextlib.contextmanager
def demo_threads(threads: int):
    """A demo's compute threads for the duration of its run (the caller's count restored after)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data-loading worker is a fork
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def demo_sft_config(settings: DemoSettings):
    """The demos' `MLMambaSFTConfig`: cosine schedule, no checkpoints, on the CPU unless a GPU is there."""
    from .arguments import MLMambaSFTConfig

    return MLMambaSFTConfig(
        output_dir=settings.output_dir, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=settings.weight_decay, max_grad_norm=1.0,
        logging_steps=100, save_strategy="no", report_to="none", seed=settings.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=settings.dataloader_workers)


def run_demo(settings: DemoSettings) -> dict:
    """Train, save, reload, score and answer through the pipeline; returns the results dict."""
    with demo_threads(settings.threads):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    from ml_mamba.model_cards import save_model_card

    from .arguments import LORA_TARGETS
    from .train import build_trainer

    started = time.perf_counter()
    images, labels, train_idx, held_idx = split_digits(settings.held_out_fraction, settings.seed)
    if settings.max_train_images:
        train_idx = train_idx[:settings.max_train_images]
    if settings.max_eval_images:
        held_idx = held_idx[:settings.max_eval_images]
    assert not set(train_idx) & set(held_idx)
    train_data = training_dataset(images, labels, train_idx, settings.seed)
    tokenizer = demo_tokenizer()
    model, processor = demo_model(tokenizer, settings)
    print(f"Digits VQA: {len(train_idx)} training images x {len(QUESTIONS)} question types = {len(train_data)} "
          f"samples; {len(held_idx)} held-out images.")
    print(f"Model: ML-Mamba (SigLIP-style tower -> MSC connector -> Mamba-2 LM), "
          f"{model.num_parameters():,} parameters, {model.config.num_image_tokens} image tokens, trained from scratch.")

    args = demo_sft_config(settings)
    peft_config = None
    if settings.lora:
        # LoRA on the LM mixers' in_proj (the rest of the LM stays at its random init); the vision tower and the
        # connector, random too, train fully.
        from peft import LoraConfig

        peft_config = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS["language_model"],
                                 modules_to_save=["vision_tower", "connector"], task_type="CAUSAL_LM")
    trainer = build_trainer(model, processor, args, train_data, peft_config=peft_config)
    train_start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - train_start

    if settings.lora:
        model = trainer.model.merge_and_unload()  # a plain checkpoint: the Hub folder needs no peft
    else:
        model = trainer.model
    model.save_pretrained(settings.output_dir)
    processor.save_pretrained(settings.output_dir)
    rows = write_held_out_task(settings.output_dir, images, labels, held_idx)

    # Everything below reads the saved folder only, as a Hub user would.
    reloaded = AutoModelForImageTextToText.from_pretrained(settings.output_dir, trust_remote_code=True)
    reloaded_processor = AutoProcessor.from_pretrained(settings.output_dir, trust_remote_code=True)
    eval_dir = os.path.join(settings.output_dir, "eval")
    eval_images = [Image.open(os.path.join(eval_dir, row["image"])).convert("RGB") for row in rows]
    predictions = answer_questions(reloaded, reloaded_processor, eval_images, [row["question"] for row in rows])
    results = score(rows, predictions)
    with open(os.path.join(eval_dir, "demo_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)

    hyperparameters = {"epochs": settings.epochs, "batch_size": settings.batch_size,
                       "learning_rate": settings.learning_rate, "lr_scheduler": "cosine", "warmup": "5%",
                       "weight_decay": settings.weight_decay, "seed": settings.seed, "lora": bool(settings.lora)}
    save_model_card(
        settings.output_dir, reloaded, tags=["digits", "demo", "trl", "sft"],
        training={"recipe": "from scratch with TRL SFTTrainer (assistant-only loss)"
                            + (", LoRA on the LM merged into the weights" if settings.lora else ""),
                  "data": f"scikit-learn digits as VQA: {len(train_idx)} training images x {len(QUESTIONS)} "
                          f"question types; {len(held_idx)} held-out images never seen in training",
                  "hyperparameters": hyperparameters, "steps": trainer.state.global_step,
                  "train_time_s": round(train_time, 1),
                  "metrics": {"held-out accuracy": round(results["overall"], 4),
                              **{f"held-out accuracy ({kind})": round(value, 4)
                                 for kind, value in results["per_type"].items()}}},
        eval_results=[{"task_type": "visual-question-answering", "dataset_type": "digits-vqa",
                       "dataset_name": "scikit-learn digits VQA (held-out)", "dataset_split": "held-out",
                       "metric_type": "accuracy", "metric_name": "exact match", "metric_value": results["overall"]}])

    pipe = pipeline("image-text-to-text", model=settings.output_dir, trust_remote_code=True)
    examples = []
    for row, image in list(zip(rows, eval_images))[:settings.pipeline_examples * len(QUESTIONS):len(QUESTIONS) + 1]:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": row["question"]}]}]
        answer = pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]  # greedy
        examples.append({"image": row["image"], "question": row["question"], "answer": answer.strip(),
                         "expected": row["answer"]})

    results.update(train_time_s=train_time, total_time_s=time.perf_counter() - started,
                   steps=trainer.state.global_step, output_dir=os.path.abspath(settings.output_dir),
                   pipeline_examples=examples, num_parameters=reloaded.num_parameters())
    return results


def _report(results: dict) -> str:
    lines = ["", "pipeline('image-text-to-text') on held-out images:"]
    for example in results["pipeline_examples"]:
        mark = "ok" if is_correct(example["answer"], example["expected"]) else f"expected {example['expected']!r}"
        lines.append(f"  {example['image']}  {example['question']!r} -> {example['answer']!r}  ({mark})")
    lines += ["", f"Held-out accuracy (exact match, {results['num_examples']} questions on images never seen in "
                  f"training): {results['overall']:.2%}"]
    lines += [f"  {kind:<18} {value:.2%}" for kind, value in results["per_type"].items()]
    lines += [f"Training time: {results['train_time_s']:.0f} s ({results['steps']} steps; "
              f"{results['total_time_s']:.0f} s for the whole demo)",
              f"Model folder (Hub-ready: safetensors, remote code, processor, model card, eval/): "
              f"{results['output_dir']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    keep_freed_memory()  # with ML_MAMBA_KEEP_FREED_MEMORY=1: freed memory reused (training/allocator.py)
    if "--task" in argv:  # `ml-mamba-demo --task video`: the video demo (training/video_demo.py)
        position = argv.index("--task")
        task = argv[position + 1] if position + 1 < len(argv) else None
        argv = argv[:position] + argv[position + 2:]
        if task == "video":
            from .video_demo import main as video_main

            return video_main(argv)
        if task != "image":
            raise SystemExit(f"ml-mamba-demo: --task must be 'image' (default) or 'video', got {task!r}")
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch compute threads.")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lora", action="store_true", help="Train the LM through LoRA adapters (merged at the end).")
    parser.add_argument("--max-train-images", type=int, default=None, help="Fewer training images (smoke runs).")
    parser.add_argument("--max-eval-images", type=int, default=None, help="Fewer held-out images (smoke runs).")
    args = parser.parse_args(argv)
    settings = DemoSettings(output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, threads=args.threads, seed=args.seed, lora=args.lora,
                            max_train_images=args.max_train_images, max_eval_images=args.max_eval_images)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(_report(run_demo(settings)))


if __name__ == "__main__":
    main()
