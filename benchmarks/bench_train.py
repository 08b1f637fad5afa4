"""Training throughput on a mixed-length batch: ML-Mamba padded vs packed (`--pack_samples`' layout) vs the
same-size LLaVA padded, side by side.

    python benchmarks/bench_train.py                          # -> benchmarks/results/train.{md,json}
    python benchmarks/bench_train.py --size tiny --output /tmp/train   # a smoke run
    python benchmarks/bench_train.py --arms "ml-mamba padded" "llava padded" --batch-size 2 --text-tokens 2048
    python benchmarks/bench_train.py --allocator keep-freed             # malloc keeps freed memory (see --help)
    python benchmarks/bench_train.py --loss trl-labelled --answer-tokens 32    # as ml-mamba-train computes its loss

The batch follows a LLaVA-like length mix: half the samples 32-128 text tokens, half 512-2048, each with one 384 px
image (729 tokens). A training step is forward + backward + AdamW on the whole model (random weights,
`vlm_pair.py`'s 129M pair, float32). Reported per arm (each in its own process): seconds per step (median of the
timed steps after one warm-up step), real (non-padding) tokens per second, tokens computed per step, peak RSS.
Every arm runs with glibc's malloc as it comes, or with `--allocator keep-freed` as `ML_MAMBA_KEEP_FREED_MEMORY=1`
sets it (`training/allocator.py`: freed memory kept for reuse; faster, more memory). The loss is the model's own
(`--loss model`, logits at every position) or TRL's fused LM head as its trainers install it: projecting every
position (`trl-every-position`, TRL's choice on CPU) or only the labelled ones (`trl-labelled`, what
`ml-mamba-train` sets up, `training/trl_compat.py`); `--answer-tokens N` labels only the last N text tokens of each
sample, as an assistant-only SFT loss does (default: every text token).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vlm_pair  # noqa: E402

from ml_mamba.training.allocator import keep_freed_memory  # noqa: E402

ARMS = {"ml-mamba padded": ("ml-mamba", False), "ml-mamba packed": ("ml-mamba", True),
        "llava padded": ("llava", False)}


def make_batch(model, arm: str, pack: bool, args):
    rng = random.Random(args.seed)
    half = args.batch_size // 2
    lengths = [rng.randint(32, 128) for _ in range(half)] + [rng.randint(512, 2048)
                                                             for _ in range(args.batch_size - half)]
    if args.text_tokens:  # every sample this long instead of the mix (no padding)
        lengths = [args.text_tokens] * args.batch_size
    lengths = [max(8, n * args.length_scale // 100) for n in lengths]
    image_tokens = (model.config.image_seq_length if arm == "llava" else model.config.num_image_tokens)
    image_id = model.config.image_token_id
    samples = [torch.cat([torch.full((image_tokens,), image_id), torch.randint(10, 250, (n,))]) for n in lengths]
    # label -100 on the image and, with --answer-tokens, on all but the last N text tokens of each sample (the prompt)
    unlabelled = [torch.arange(len(s)) < (len(s) - args.answer_tokens if args.answer_tokens else image_tokens)
                  for s in samples]
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(samples), 3, size, size)
    real = sum(len(s) for s in samples)
    if pack:
        ids = torch.cat(samples)[None]
        labels = ids.masked_fill(torch.cat(unlabelled)[None], -100)
        position_ids = torch.cat([torch.arange(len(s)) for s in samples])[None]
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "pixel_values": pixels}, real, \
            ids.numel()
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
        labels[row, :len(sample)] = sample.masked_fill(unlabelled[row], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}, real, ids.numel()


def worker(args) -> dict:
    if args.allocator == "keep-freed" and not keep_freed_memory(force=True):
        raise RuntimeError("--allocator keep-freed needs glibc's mallopt (Linux).")
    torch.set_num_threads(args.threads)
    arm, pack = ARMS[args.arm]
    model = vlm_pair.build_model(arm, args.size).train()
    if args.checkpointing:  # activation checkpointing for every arm alike (what fits long batches in memory)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, real, computed = make_batch(model, arm, pack, args)
    if args.loss != "model":  # TRL's fused LM head, as SFTTrainer / DPOTrainer install it
        from trl.trainer import add_fused_lm_head

        from ml_mamba.training import score_labelled_positions_on_cpu

        if args.loss == "trl-labelled":
            score_labelled_positions_on_cpu()
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # SFTTrainer's outputs
        batch["fused_lm_head"] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for _ in range(1 + args.steps):
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    step = sorted(times[1:])[len(times[1:]) // 2]
    return {"arm": args.arm, "step_s": step, "real_tokens": real, "computed_tokens": computed,
            "tokens_per_s": real / step, "loss": float(loss),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="s", choices=sorted(vlm_pair.SIZES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length-scale", type=int, default=100, help="percent of the text lengths (smoke runs)")
    parser.add_argument("--text-tokens", type=int, default=0,
                        help="give every sample this many text tokens (plus its image) instead of the length mix")
    parser.add_argument("--loss", default="model", choices=["model", "trl-every-position", "trl-labelled"],
                        help="the model's own loss, or TRL's fused LM head over every position / the labelled ones")
    parser.add_argument("--answer-tokens", type=int, default=0,
                        help="label only the last N text tokens of each sample (assistant-only loss); 0: all text")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every activation (the default recomputes them: the padded batch needs >20 GB "
                             "without)")
    parser.add_argument("--allocator", default="glibc-default", choices=["glibc-default", "keep-freed"],
                        help="glibc's defaults, or malloc keeping freed memory (training/allocator.py, "
                             "ML_MAMBA_KEEP_FREED_MEMORY=1 for ml-mamba-train); every arm runs with the same")
    parser.add_argument("--output", default="benchmarks/results/train")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    meta = vlm_pair.run_meta(args.threads, size=args.size, batch_size=args.batch_size, steps=args.steps,
                             allocator=args.allocator, text_tokens=args.text_tokens, loss=args.loss,
                             answer_tokens=args.answer_tokens)
    rows = []
    for arm in args.arms:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--arm", arm, "--size", args.size,
                   "--batch-size", str(args.batch_size), "--length-scale", str(args.length_scale),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
                   "--allocator", args.allocator, "--text-tokens", str(args.text_tokens),
                   "--loss", args.loss, "--answer-tokens", str(args.answer_tokens)]
        command += [] if args.checkpointing else ["--no-checkpointing"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"arm": arm, "error": result.stderr.strip()[-300:] or f"exit {result.returncode}"})
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    meta["load_after"] = vlm_pair.load_average()
    samples = f"{args.text_tokens} text tokens each" if args.text_tokens else "the length mix"
    labelled = f", labels on the last {args.answer_tokens} text tokens of each sample" if args.answer_tokens else ""
    lines = [f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, load {meta['load_before']} before / {meta['load_after']} after; size "
             f"{meta['size']}, batch of {args.batch_size} ({samples}), median of {args.steps} steps after one warm-up, "
             f"activation checkpointing {'on' if args.checkpointing else 'off'}, allocator {args.allocator}, "
             f"loss {args.loss}{labelled}.", "",
             "| arm | s/step | real tokens | tokens computed | real tokens/s | vs ML-Mamba padded | peak RSS GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = next((r["tokens_per_s"] for r in rows if r["arm"] == "ml-mamba padded" and "error" not in r), None)
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['arm']} | failed: {row['error'][:120]} | | | | | |")
            continue
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {row['arm']} | {row['step_s']:.1f} | {row['real_tokens']:,} | {row['computed_tokens']:,} | "
                     f"{row['tokens_per_s']:.0f} | {ratio} | {row['peak_rss_bytes'] / 1e9:.1f} |")
    vlm_pair.write_report(args.output, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
