"""Per-turn latency of a multi-turn chat: ML-Mamba continuing from its saved state vs re-prefilling the whole chat,
and LLaVA continuing from its KV cache, side by side in one process.

    python benchmarks/bench_chat.py                      # ~3 min on 2 cores -> benchmarks/results/chat.{md,json}
    python benchmarks/bench_chat.py --size tiny --turns 4 --output /tmp/chat   # a smoke run

The chat: one 384 px image (729 visual tokens) and a question in turn 1, then ``--turns - 1`` text turns of
``--user-tokens`` tokens each; every turn generates exactly ``--new-tokens`` tokens (greedy), which stay in the
history as generated (ids, so no tokenizer round trip). A turn's latency is its whole `generate` call (prompt
processing and decoding). Random weights (`vlm_pair.py`'s 129M pair): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vlm_pair  # noqa: E402

from modeling_ml_mamba.ml_mamba_compat import GENERATE_CACHE_NAME  # noqa: E402

ARMS = {"ml-mamba (continue)": ("ml-mamba", True), "ml-mamba (re-prefill)": ("ml-mamba", False),
        "llava (KV cache)": ("llava", True)}
USER_TURN = " Tell me one more detail about the picture, in a few words please, and then say what you would ask next."


def run_arm(arm: str, continue_state: bool, args) -> list[dict]:
    """Per-turn records (turn, prompt tokens, tokens processed, seconds) for one arm."""
    tok = vlm_pair.tokenizer()
    model = vlm_pair.build_model(arm, args.size)
    processor = vlm_pair.processor(arm, model, tok)
    size = model.config.vision_config.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    inputs = dict(processor(images=[image], text=[vlm_pair.PROMPT], return_tensors="pt"))
    user = processor.tokenizer(USER_TURN * 4, return_tensors="pt")["input_ids"][:, :args.user_tokens]
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    return_dict_in_generate=True)
    records, cache, seen = [], None, 0
    with torch.no_grad():
        for turn in range(1, args.turns + 1):
            step_inputs = dict(inputs)
            extra = {}
            if continue_state and cache is not None:
                extra[GENERATE_CACHE_NAME] = cache
                if arm == "llava":  # LLaVA's image is in its KV cache; it does not drop seen images itself
                    step_inputs.pop("pixel_values")
            started = time.perf_counter()
            out = model.generate(**step_inputs, **extra, **generate)
            seconds = time.perf_counter() - started
            prompt = inputs["input_ids"].shape[1]
            records.append({"turn": turn, "prompt_tokens": prompt, "processed": prompt - (seen if extra else 0),
                            "seconds": seconds})
            cache, seen = getattr(out, GENERATE_CACHE_NAME), out.sequences.shape[1] - 1
            ids = torch.cat([out.sequences, user], dim=1)
            inputs = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            print(json.dumps({"arm": arm, "continue": continue_state, **records[-1]}), flush=True)
    return records


def markdown(results: dict) -> str:
    meta = results["meta"]
    arms = list(results["arms"])
    lines = [f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, load {meta['load_before']} before / {meta['load_after']} after; size "
             f"{meta['size']}, {meta['turns']} turns, {meta['user_tokens']} user tokens and {meta['new_tokens']} new "
             "tokens per turn, the image in turn 1.", "",
             "| turn | prompt tokens | " + " | ".join(f"{arm} s (tokens processed)" for arm in arms) + " |",
             "|---:|---:|" + "---:|" * len(arms)]
    turns = len(next(iter(results["arms"].values())))
    shown = sorted({1, 2, 5, 10, 15, turns} & set(range(1, turns + 1)))
    for turn in shown:
        row = [results["arms"][arm][turn - 1] for arm in arms]
        lines.append(f"| {turn} | {row[0]['prompt_tokens']} | "
                     + " | ".join(f"{r['seconds']:.2f} ({r['processed']})" for r in row) + " |")
    lines += ["", "| arm | turn N / turn 1 | turn N / turn 2 | all turns, s |", "|---|---:|---:|---:|"]
    for arm in arms:
        rows = results["arms"][arm]
        lines.append(f"| {arm} | {rows[-1]['seconds'] / rows[0]['seconds']:.2f}x | "
                     f"{rows[-1]['seconds'] / rows[min(1, len(rows) - 1)]['seconds']:.2f}x | "
                     f"{sum(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="s", choices=sorted(vlm_pair.SIZES))
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--user-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--output", default="benchmarks/results/chat")
    args = parser.parse_args(argv)
    if args.turns < 2:
        parser.error(f"--turns must be at least 2, got {args.turns}")
    torch.set_num_threads(args.threads)
    meta = vlm_pair.run_meta(args.threads, size=args.size, turns=args.turns, user_tokens=args.user_tokens,
                             new_tokens=args.new_tokens)
    results = {"meta": meta, "arms": {}}
    for name in args.arms:
        results["arms"][name] = run_arm(*ARMS[name], args)
    meta["load_after"] = vlm_pair.load_average()
    vlm_pair.write_report(args.output, results, markdown(results))

if __name__ == "__main__":
    main()
