"""The offline video demo: "videos" of 4-16 handwritten digits, with questions that need more than one frame.

    ml-mamba-demo --task video          # or: python -m ml_mamba.training.video_demo

Each video is a sequence of scikit-learn digits (train and held-out videos are built from disjoint digit images,
the split of the image demo). Three question types, each needing several frames:

* "How many odd digits are shown?"                 -> "3"
* "Which digit comes right after the seven?"       -> "four"   (the named digit appears once, not last)
* "What is the sum of the first and last digits?"  -> "11"

The question comes before the video (``[question, <video>]`` in the user turn), so the recurrent state knows what to
keep while it reads the frames; a separator token ("|") precedes each frame. The image demo's small ML-Mamba (4 LM
layers, a causal conv of 8 tokens) with video support (``video_token_id``), trained from scratch by TRL's
`SFTTrainer` through ``build_trainer`` (video samples in a ``videos`` column) in three stages: the image demo's
single-digit questions (2 epochs), 6,000 short videos of 2-4 frames, then the 12,000 videos of 4-16 frames (3.5
epochs; "after", the hardest type, asked twice as often as the others); then saved, reloaded with the Auto classes
and scored on held-out videos per question type. The held-out set is also written as `ml-mamba-eval`'s
``video-digits`` task (``eval/video_digits.jsonl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass

import torch

from .digits_demo import (NUMBER_WORDS, DemoSettings, demo_sft_config, demo_threads, digit_image, score,
                          split_digits)

# The three multi-frame questions, and two single-frame ones ("Which digit is shown first / last?") that give
# the vision side a direct signal (without them the model does not learn to read the frames in 10 minutes).
QUESTION_TYPES = ("count_odd", "after", "first_plus_last", "first", "last")
MULTI_FRAME_TYPES = QUESTION_TYPES[:3]


@dataclass
class VideoDemoSettings(DemoSettings):
    output_dir: str = "outputs/video-demo"
    epochs: float = 3.5
    train_videos: int = 12000
    held_out_videos: int = 600
    min_frames: int = 4
    max_frames: int = 16
    hidden_size: int = 96
    lm_layers: int = 4
    # Two compute threads, no data worker: the frames make the tensors large enough that a second thread pays
    # (a training step 0.40 -> 0.32 s), and collating a batch takes ~0.04 s in the main process.
    threads: int = 2
    dataloader_workers: int = 0
    # A separator token before each frame: the frame boundaries the counting and "after" questions need.
    frame_template: str | None = "|"
    # The curriculum: digits as single images first, then short videos, then the 4-16-frame ones.
    image_warmup_epochs: float = 2.0
    short_videos: int = 6000
    frame_pool: int = 1
    # The LM's causal conv spans a frame and its separator (4 + 1 tokens), so a frame's tokens see the frame before
    # them directly, what "which digit comes right after ..." needs (Mamba-2's default of 4 does not reach). On a
    # GPU with the causal-conv1d package (widths 2-4 only) pass --conv-kernel 4.
    conv_kernel: int = 8
    # The question types of the training videos, in rotation (repeat a type to ask it more often); held-out videos
    # always rotate through QUESTION_TYPES. "after" is asked twice as often as the others: with 1/5 of the
    # questions the model did not learn it in 10 minutes (39 % held out), with 2/6 it does (93-96 %).
    question_mix: tuple[str, ...] = ("count_odd", "after", "first_plus_last", "after", "first", "last")


def make_question(labels: list[int], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of type ``kind`` about a video whose frames show ``labels``; None if it does not apply."""
    if kind == "count_odd":
        return "How many odd digits are shown?", str(sum(label % 2 for label in labels))
    if kind == "first_plus_last":
        return "What is the sum of the first and last digits?", str(labels[0] + labels[-1])
    if kind in ("first", "last"):
        return f"Which digit is shown {kind}?", NUMBER_WORDS[labels[0 if kind == "first" else -1]]
    candidates = [d for d in set(labels[:-1]) if labels.count(d) == 1]
    if not candidates:
        return None
    digit = rng.choice(sorted(candidates))
    return f"Which digit comes right after the {NUMBER_WORDS[digit]}?", NUMBER_WORDS[labels[labels.index(digit) + 1]]


def make_videos(images, labels, indices, count: int, settings: VideoDemoSettings, seed: int,
                kinds: tuple[str, ...] = QUESTION_TYPES) -> list[dict]:
    """``count`` samples: frames (digit image indices), their labels, one question of a type rotating through
    ``kinds`` (repeat a type to ask it more often), the answer."""
    rng = random.Random(seed)
    pool = list(indices)
    samples = []
    while len(samples) < count:
        length = rng.randint(settings.min_frames, settings.max_frames)
        frames = [int(rng.choice(pool)) for _ in range(length)]
        frame_labels = [int(labels[i]) for i in frames]
        kind = kinds[len(samples) % len(kinds)]
        qa = make_question(frame_labels, kind, rng)
        if qa is not None:
            samples.append({"frames": frames, "labels": frame_labels, "question_type": kind,
                            "question": qa[0], "answer": qa[1]})
    return samples


def chat(question: str, answer: str | None = None) -> list[dict]:
    """The question, then the video; the answer for training."""
    messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "video"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def video_tokenizer():
    """The image demo's tokenizer, trained on the video questions and answers too."""
    from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer

    from .digits_demo import QUESTIONS

    questions = ["How many odd digits are shown?", "What is the sum of the first and last digits?",
                 "Which digit is shown first?", "Which digit is shown last?"] + [
        f"Which digit comes right after the {word}?" for word in NUMBER_WORDS]
    answers = list(NUMBER_WORDS) + [str(n) for n in range(19)]
    corpus = questions + answers + [q for q, _ in QUESTIONS.values()] + [" ".join(answers)]
    return train_bpe_tokenizer(corpus * 20, vocab_size=360)


def video_model(tokenizer, settings: VideoDemoSettings):
    """(model, processor): the image demo's ML-Mamba with video support."""
    from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor

    hidden = settings.hidden_size
    config = MLMambaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, image_size=8, patch_size=settings.patch_size),
        text_config=dict(model_type="mamba2", hidden_size=hidden, num_hidden_layers=settings.lm_layers,
                         num_heads=2 * hidden // 16,
                         head_dim=16, state_size=16, n_groups=1, expand=2, chunk_size=64, vocab_size=8,
                         conv_kernel=settings.conv_kernel,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0),
        connector_type="msc", connector_scan="bidirectional", connector_num_blocks=1, connector_chunk_size=16,
        image_size=8, vision_feature_layer=-1, initializer_range=0.1, vision_batch_size=512,
        video_frame_pool=settings.frame_pool,
    ).fit_tokenizer(tokenizer, video_token="<video>")
    from transformers import SiglipImageProcessor

    processor = MLMambaProcessor.from_config(config, tokenizer, image_processor=SiglipImageProcessor(
        size={"height": 8, "width": 8}), frame_template=settings.frame_template)
    torch.manual_seed(settings.seed)
    return MLMambaForConditionalGeneration(config), processor


def write_held_out_task(output_dir: str, images, samples: list[dict]) -> str:
    """``eval/video_digits.jsonl`` + ``eval/images/*.png``: the held-out videos as `ml-mamba-eval`'s video-digits
    task (each frame a path to its digit image). Returns the file's path."""
    image_dir = os.path.join(output_dir, "eval", "images")
    os.makedirs(image_dir, exist_ok=True)
    for index in sorted({i for sample in samples for i in sample["frames"]}):
        digit_image(images[index]).save(os.path.join(image_dir, f"digit_{index:04d}.png"))
    path = os.path.join(output_dir, "eval", "video_digits.jsonl")
    with open(path, "w") as handle:
        for number, sample in enumerate(samples):
            handle.write(json.dumps({
                "question_id": f"{number:04d}-{sample['question_type']}",
                "video": [f"images/digit_{i:04d}.png" for i in sample["frames"]], "question": sample["question"],
                "answer": sample["answer"], "question_type": sample["question_type"]}) + "\n")
    return path


def training_dataset(images, samples: list[dict]):
    from datasets import Dataset

    # An (empty) "images" column marks the dataset as vision-language for TRL, which then leaves tokenizing to
    # the collator (our `VideoSampleCollator` around TRL's).
    rows = [{"messages": chat(s["question"], s["answer"]), "images": [],
             "videos": [[digit_image(images[i]) for i in s["frames"]]]} for s in samples]
    from datasets import Image, List

    return Dataset.from_list(rows).cast_column("videos", List(List(Image())))  # frames read back as PIL images


@torch.no_grad()
def answer_videos(model, processor, videos: list[list], questions: list[str], batch_size: int = 200,
                  progress: bool = True) -> list[str]:
    """Greedy answers (``max_new_tokens=4``) to ``questions`` about ``videos`` (lists of frames), batched."""
    from tqdm.auto import tqdm

    model.eval()
    predictions = []
    for start in tqdm(range(0, len(questions), batch_size), desc="Answering held-out videos", disable=not progress):
        texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False)
                 for q in questions[start:start + batch_size]]
        batch_videos = [[video] for video in videos[start:start + batch_size]]
        inputs = processor(videos=batch_videos, text=texts, padding=True, return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=4)
        predictions += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return predictions


def run_video_demo(settings: VideoDemoSettings) -> dict:
    """Train, save, reload and score the video demo; returns the results dict (overall and per question type)."""
    with demo_threads(settings.threads):
        return _run_video_demo(settings)


def _run_video_demo(settings: VideoDemoSettings) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .train import build_trainer

    started = time.perf_counter()
    images, labels, train_idx, held_idx = split_digits(settings.held_out_fraction, settings.seed)
    train = make_videos(images, labels, train_idx, settings.train_videos, settings, settings.seed,
                        settings.question_mix)
    held = make_videos(images, labels, held_idx, settings.held_out_videos, settings, settings.seed + 1)
    tokenizer = video_tokenizer()
    model, processor = video_model(tokenizer, settings)
    print(f"Video digits: {len(train)} training videos ({settings.min_frames}-{settings.max_frames} frames, "
          f"{len(train_idx)} digit images), {len(held)} held-out videos of {len(held_idx)} other images; "
          f"{model.num_parameters():,} parameters, {model.config.num_video_frame_tokens} tokens per frame.")
    args = demo_sft_config(settings)
    train_start = time.perf_counter()
    if settings.image_warmup_epochs:
        # First teach the vision tower and connector to read a digit (the image demo's questions, one image each);
        # the frames go through the same tower and connector.
        from .digits_demo import training_dataset as image_dataset

        warmup_args = dataclasses.replace(args, num_train_epochs=settings.image_warmup_epochs)
        build_trainer(model, processor, warmup_args, image_dataset(images, labels, train_idx, settings.seed)).train()
    if settings.short_videos:
        # Then a curriculum step: short videos (2-4 frames), where what to keep is easy to find, before the long ones.
        short_settings = dataclasses.replace(settings, min_frames=2, max_frames=4)
        short = make_videos(images, labels, train_idx, settings.short_videos, short_settings, settings.seed + 2,
                            settings.question_mix)
        short_args = dataclasses.replace(args, num_train_epochs=1)
        build_trainer(model, processor, short_args, training_dataset(images, short)).train()
    trainer = build_trainer(model, processor, args, training_dataset(images, train))
    trainer.train()
    train_time = time.perf_counter() - train_start
    trainer.model.save_pretrained(settings.output_dir)
    processor.save_pretrained(settings.output_dir)

    reloaded = AutoModelForImageTextToText.from_pretrained(settings.output_dir, trust_remote_code=True)
    reloaded_processor = AutoProcessor.from_pretrained(settings.output_dir, trust_remote_code=True)
    videos = [[digit_image(images[i]) for i in sample["frames"]] for sample in held]
    predictions = answer_videos(reloaded, reloaded_processor, videos, [s["question"] for s in held])
    results = score(held, predictions)
    write_held_out_task(settings.output_dir, images, held)
    with open(os.path.join(settings.output_dir, "eval", "video_digits_predictions.jsonl"), "w") as handle:
        for sample, prediction in zip(held, predictions):
            handle.write(json.dumps({**sample, "prediction": prediction}) + "\n")
    results.update(train_time_s=train_time, total_time_s=time.perf_counter() - started,
                   steps=trainer.state.global_step, output_dir=os.path.abspath(settings.output_dir))
    with open(os.path.join(settings.output_dir, "eval", "demo_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return results


def main(argv: list[str] | None = None) -> None:
    defaults = VideoDemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-videos", type=int, default=defaults.train_videos)
    parser.add_argument("--held-out-videos", type=int, default=defaults.held_out_videos)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--lm-layers", type=int, default=defaults.lm_layers)
    parser.add_argument("--image-warmup-epochs", type=float, default=defaults.image_warmup_epochs,
                        help="epochs of single-digit image questions before the videos (0: none)")
    parser.add_argument("--short-videos", type=int, default=defaults.short_videos,
                        help="videos of 2-4 frames trained on (one epoch) before the 4-16-frame ones (0: none)")
    parser.add_argument("--frame-pool", type=int, default=defaults.frame_pool,
                        help="average-pool each frame's token grid by this factor per side (2: 4 -> 1 token a frame)")
    parser.add_argument("--conv-kernel", type=int, default=defaults.conv_kernel,
                        help="the LM's causal conv width (8: a frame's tokens see the frame before)")
    parser.add_argument("--question-mix", nargs="+", choices=QUESTION_TYPES, default=list(defaults.question_mix),
                        help="the training videos' question types in rotation (repeat one to ask it more often)")
    parser.add_argument("--frame-template", default=defaults.frame_template,
                        help='text before each frame\'s tokens, formatted with {index} and {time}, e.g. "|"')
    args = parser.parse_args(argv)
    settings = VideoDemoSettings(output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size,
                                 learning_rate=args.learning_rate, threads=args.threads, seed=args.seed,
                                 train_videos=args.train_videos, held_out_videos=args.held_out_videos,
                                 hidden_size=args.hidden_size, lm_layers=args.lm_layers,
                                 frame_template=args.frame_template, image_warmup_epochs=args.image_warmup_epochs,
                                 frame_pool=args.frame_pool, short_videos=args.short_videos,
                                 conv_kernel=args.conv_kernel, question_mix=tuple(args.question_mix))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    results = run_video_demo(settings)
    print(f"\nHeld-out exact match ({results['num_examples']} questions on videos of unseen digit images): "
          f"{results['overall']:.2%}")
    for kind, value in results["per_type"].items():
        print(f"  {kind:<16} {value:.2%}")
    print(f"Training time: {results['train_time_s']:.0f} s ({results['steps']} steps); model folder: "
          f"{results['output_dir']}")


if __name__ == "__main__":
    main()
