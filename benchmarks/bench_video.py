"""Long videos at constant decode memory: ML-Mamba vs the same-size LLaVA on 1 to 256 frames, side by side.

    python benchmarks/bench_video.py                      # -> benchmarks/results/video.{md,json}
    python benchmarks/bench_video.py --size tiny --frames 1 4 --output /tmp/video   # a smoke run

Each (arm, frame count) runs in its own process (its peak RSS is its own): a prompt of ``frames`` 384 px frames
(729 tokens each, or ``--pool 2``: 196) and a short question, one prefill forward that fills the cache (the frames
encoded `vision_batch_size` at a time for ML-Mamba; LLaVA encodes its images at once, as transformers does), then
``--decode-steps`` cached one-token steps. Reported: prefill seconds, decode ms/token after the video, cache bytes,
peak RSS above the loaded model. An arm stops growing once a run fails, runs out of memory (24 GB machine) or its
prefill would exceed ``--max-prefill-s`` (estimated from the previous size, quadratic for attention); the report
says where each stopped. Random weights (`vlm_pair.py`'s 129M pair).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vlm_pair  # noqa: E402

VIDEO_TOKEN_ID = 5  # any id of the vocabulary: the prompt is built from ids, no processor involved


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model = vlm_pair.build_model(args.arm, args.size)
    if args.arm == "ml-mamba":
        model.config.video_token_id, model.config.video_frame_pool = VIDEO_TOKEN_ID, args.pool
        model.config.vision_batch_size = args.vision_batch_size
        per_frame, token = model.config.num_video_frame_tokens, VIDEO_TOKEN_ID
    else:
        per_frame, token = model.config.image_seq_length, model.config.image_token_id
    size = model.config.vision_config.image_size
    question = torch.randint(10, 200, (1, 24))
    input_ids = torch.cat([torch.full((1, args.frames * per_frame), token), question], dim=1)
    pixels = torch.randn(args.frames, 3, size, size)
    baseline = _rss_bytes()
    key = "pixel_values_videos" if args.arm == "ml-mamba" else "pixel_values"
    with torch.no_grad():
        started = time.perf_counter()
        out = model(input_ids=input_ids, **{key: pixels}, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        cache = getattr(out, vlm_pair._cache_name(args.arm))
        token_ids = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.decode_steps):
            started = time.perf_counter()
            logits = vlm_pair.decode_step(args.arm, model, token_ids, cache)
            times.append(time.perf_counter() - started)
            token_ids = logits[:, -1:].argmax(-1)
    times = sorted(times[2:]) or sorted(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"arm": args.arm, "frames": args.frames, "tokens": int(input_ids.shape[1]), "prefill_s": prefill,
            "decode_ms": 1000 * times[len(times) // 2], "cache_bytes": vlm_pair.cache_bytes(cache),
            "peak_above_model_bytes": peak - baseline}


def run(arm: str, frames: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--arm", arm, "--frames", str(frames),
               "--size", args.size, "--threads", str(args.threads), "--pool", str(args.pool),
               "--vision-batch-size", str(args.vision_batch_size),
               "--decode-steps", str(args.decode_steps)]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.max_run_s)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "frames": frames, "error": f"over {args.max_run_s} s"}
    if result.returncode != 0:
        reason = "killed (out of memory)" if result.returncode in (-9, 137) else result.stderr.strip()[-300:]
        return {"arm": arm, "frames": frames, "error": reason}
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - started
    return row


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, load {meta['load_before']} before / {meta['load_after']} after; size "
             f"{meta['size']}, ML-Mamba frames pooled {meta['pool']}x{meta['pool']} per side, "
             f"{meta['vision_batch_size']} frames per vision call.", "",
             "| arm | frames | prompt tokens | prefill s | decode ms/token | cache MB | peak RSS above model MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['arm']} | {row['frames']} | | not run: {row['error']} | | | |")
            continue
        lines.append(f"| {row['arm']} | {row['frames']} | {row['tokens']:,} | {row['prefill_s']:.1f} | "
                     f"{row['decode_ms']:.1f} | {row['cache_bytes'] / 2**20:.1f} | "
                     f"{row['peak_above_model_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """Prefill seconds, decode ms/token and the cache held between steps against the frame count, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ml-mamba": "tab:green", "llava": "tab:red"}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for arm in dict.fromkeys(row["arm"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["arm"] == arm and "error" not in row]
        frames = [row["frames"] for row in rows]
        for axis, values in zip(axes, ([row["prefill_s"] for row in rows], [row["decode_ms"] for row in rows],
                                       [row["cache_bytes"] / 2**20 for row in rows])):
            axis.plot(frames, values, "-o", color=colors.get(arm), label=arm, linewidth=2)
        stopped = [row for row in results["rows"] if row["arm"] == arm and "error" in row]
        if stopped:
            axes[0].annotate(f"{arm}: {stopped[0]['frames']} frames not run", xy=(0.02, 0.92),
                             xycoords="axes fraction", fontsize=7, color=colors.get(arm))
    titles = ("prefill seconds", "decode ms per token after the video", "cache held between steps (MB)")
    meta = results["meta"]
    vlm_pair.finish_log_plot(
        figure, axes, titles, "frames (729 tokens each)" if meta["pool"] == 1 else "frames",
        f"Video prompts: ML-Mamba vs LLaVA, size {meta['size']}, CPU {meta['threads']} threads, float32", path)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="s", choices=sorted(vlm_pair.SIZES))
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--arms", nargs="+", default=["ml-mamba", "llava"], choices=["ml-mamba", "llava"])
    parser.add_argument("--pool", type=int, default=1, help="ML-Mamba's video_frame_pool (1: 729 tokens a frame)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vision-batch-size", type=int, default=16, help="ML-Mamba's frames per vision call")
    parser.add_argument("--decode-steps", type=int, default=10)
    parser.add_argument("--max-prefill-s", type=float, default=900.0)
    parser.add_argument("--max-run-s", type=int, default=2400)
    parser.add_argument("--output", default="benchmarks/results/video")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="redraw <output>.png from <output>.json")
    args = parser.parse_args(argv)
    if args.plot_only:
        with open(args.output + ".json") as handle:
            plot(json.load(handle), args.output + ".png")
        return
    if args.worker:
        args.frames = args.frames[0]
        print(json.dumps(worker(args)))
        return
    meta = vlm_pair.run_meta(args.threads, size=args.size, pool=args.pool, vision_batch_size=args.vision_batch_size)
    rows = []
    for arm in args.arms:
        previous = None
        for frames in sorted(args.frames):
            if previous is not None:
                growth = (frames / previous["frames"]) ** (2 if arm == "llava" else 1)
                if "error" in previous or previous["prefill_s"] * growth > args.max_prefill_s:
                    why = previous.get("error") or (f"prefill estimated at {previous['prefill_s'] * growth:.0f} s "
                                                    f"(> {args.max_prefill_s:.0f} s)")
                    rows.append({"arm": arm, "frames": frames, "error": f"stopped: {why}"})
                    print(json.dumps(rows[-1]), flush=True)
                    break
            previous = run(arm, frames, args)
            rows.append(previous)
            print(json.dumps(previous), flush=True)
    meta["load_after"] = vlm_pair.load_average()
    results = {"meta": meta, "rows": rows}
    vlm_pair.write_report(args.output, results, markdown(results))
    plot(results, args.output + ".png")

if __name__ == "__main__":
    main()
