"""ML-Mamba vs a same-size transformer VLM on CPU, side by side in one run: decode, prefill, memory, end to end.

    python benchmarks/bench_vlm.py                       # the full run recorded in benchmarks/RESULTS.md
    python benchmarks/bench_vlm.py --size tiny --contexts 64 256 --new-tokens 16   # a smoke run

Arms (see `vlm_pair.py`): ``ml-mamba`` (this package, fast CPU path), ``ml-mamba-hf`` (the same model on
transformers' reference PyTorch path) and ``llava`` (transformers' `LlavaForConditionalGeneration` + Llama, SDPA),
with the same vision tower, the same 729 image tokens, the same LM width and matched LM parameter counts.

* Sweep: one fresh process per (context, arm), so peak RSS belongs to that point. The LM prefills a context of
  random token embeddings (the image tokens + prompt length), then decodes greedily with the cache, one token per
  forward (the call `generate` makes), at batch 1 and then batch 8 (the batch-1 cache replicated 8 times:
  identical work per step, without paying 8 prefills). Reported: prefill seconds (median of repeats), decode
  ms/token (median over steps), cache bytes held between steps, current and peak RSS.
* End to end, as the papers measure it: one 384x384 image (729 visual tokens) + a short prompt through the real
  processor, `generate(max_new_tokens=256, min_new_tokens=256)`, greedy; tokens/s = 256 / total time.

Writes ``<output>.json`` (everything), ``<output>.md`` (tables) and ``<output>.png`` (plot); prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1e6


# --------------------------------------------------------------------------------------------- measurement workers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if len(values) % 2 else 0.5 * (values[len(values) // 2 - 1] + values[len(values) // 2])


def _time_decode(vlm_pair, arm, model, tokens, cache, steps, warmup):
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        logits = vlm_pair.decode_step(arm, model, tokens, cache)
        tokens = logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, tokens


def worker_sweep(args) -> dict:
    """One (arm, context) point: prefill, decode at batch 1, then at batch 8."""
    import torch

    import vlm_pair

    torch.set_num_threads(args.threads)
    model = vlm_pair.build_model(args.arm, args.size)
    rss_model = _rss_bytes()
    hidden = model.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.text_config.vocab_size, (1, args.context), generator=generator)
    result = {"arm": args.arm, "context": args.context, "threads": args.threads, "rss_model_mb": rss_model / MB,
              "params": vlm_pair.parameter_counts(model), "hidden": hidden}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        prefill_times = []
        while True:
            cache = None  # free the previous cache before the next prefill
            start = time.perf_counter()
            logits, cache = vlm_pair.prefill(args.arm, model, embeds)
            prefill_times.append(time.perf_counter() - start)
            if len(prefill_times) >= args.prefill_repeats or sum(prefill_times) > args.prefill_budget_s:
                break
        result.update(prefill_s=_median(prefill_times), prefill_runs=prefill_times,
                      peak_rss_prefill_mb=_peak_rss_bytes() / MB)
        tokens = logits[:, -1:].argmax(-1)

        times, _ = _time_decode(vlm_pair, args.arm, model, tokens, cache, args.decode_steps, warmup=2)
        result["decode"] = {"1": {"ms_per_token": 1e3 * _median(times), "min_ms": 1e3 * min(times),
                                  "tokens_per_s": 1 / _median(times),
                                  "cache_mb": vlm_pair.cache_bytes(cache) / MB, "rss_mb": _rss_bytes() / MB,
                                  "peak_rss_mb": _peak_rss_bytes() / MB, "steps": len(times)}}
        if 8 in args.batches:
            needed = 8 * vlm_pair.cache_bytes(cache) * 1.25  # the replicated cache + one layer's growth per step
            if needed > 0.8 * _mem_available_bytes():
                result["decode"]["8"] = {"skipped": f"needs ~{needed / 1e9:.1f} GB, "
                                                    f"{_mem_available_bytes() / 1e9:.1f} GB available"}
            else:
                cache.reorder_cache(torch.zeros(8, dtype=torch.long))
                tokens8 = tokens.repeat(8, 1)
                steps8 = max(4, args.decode_steps // 2)
                times, _ = _time_decode(vlm_pair, args.arm, model, tokens8, cache, steps8, warmup=1)
                result["decode"]["8"] = {"ms_per_token": 1e3 * _median(times), "min_ms": 1e3 * min(times),
                                         "tokens_per_s": 8 / _median(times),
                                         "cache_mb": vlm_pair.cache_bytes(cache) / MB, "rss_mb": _rss_bytes() / MB,
                                         "peak_rss_mb": _peak_rss_bytes() / MB, "steps": len(times)}
    return result


def worker_e2e(args) -> dict:
    """The papers' measurement: one image + a short prompt, 256 new tokens, greedy, total wall time."""
    import numpy as np
    import torch
    from PIL import Image

    import vlm_pair

    torch.set_num_threads(args.threads)
    tok = vlm_pair.tokenizer()
    model = vlm_pair.build_model(args.arm, args.size, image_token_id=tok.convert_tokens_to_ids("<image>"))
    processor = vlm_pair.processor(args.arm, model, tok)
    side = model.config.vision_config.image_size
    y, x = np.mgrid[0:side, 0:side] / side  # a smooth synthetic RGB picture
    image = Image.fromarray((np.stack([x, y, (x + y) / 2], -1) * 255).astype(np.uint8))
    inputs = processor(images=image, text=vlm_pair.PROMPT, return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    generate = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **generate)  # warm-up
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **generate)
        ttft = time.perf_counter() - start
        encodes = []  # the image's share of the first token: vision tower + connector (LLaVA: + its MLP projector)
        for _ in range(3):
            start = time.perf_counter()
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
            encodes.append(time.perf_counter() - start)
        totals = []
        for _ in range(args.e2e_repeats):
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **generate)
            totals.append(time.perf_counter() - start)
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    total = _median(totals)
    return {"arm": args.arm, "image_tokens": image_tokens, "prompt_tokens": inputs["input_ids"].shape[1],
            "new_tokens": new_tokens, "ttft_s": ttft, "image_encode_s": _median(encodes), "total_s": total, "runs_s": totals,
            "tokens_per_s": new_tokens / total, "decode_tokens_per_s": (new_tokens - 1) / max(total - ttft, 1e-9),
            "peak_rss_mb": _peak_rss_bytes() / MB, "params": vlm_pair.parameter_counts(model)}


# ------------------------------------------------------------------------------------------------------ driver
def _run_worker(kind: str, args, **fields) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--size", args.size,
               "--threads", str(args.threads), "--decode-steps", str(args.decode_steps),
               "--prefill-repeats", str(args.prefill_repeats), "--prefill-budget-s", str(args.prefill_budget_s),
               "--new-tokens", str(args.new_tokens), "--e2e-repeats", str(args.e2e_repeats),
               "--batches", *map(str, args.batches)]
    for key, value in fields.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.worker_timeout_s)
    if done.returncode:
        raise RuntimeError(f"worker {kind} {fields} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(wall_s=time.perf_counter() - start, load_after=os.getloadavg()[0])
    return result


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:,.{digits}f}"


def summarize(results: dict) -> dict:
    """Ratios and the issue's CPU goals, from the sweep and e2e results."""
    sweep = {(r["arm"], r["context"]): r for r in results["sweep"]}
    contexts = sorted({r["context"] for r in results["sweep"]})
    arms = sorted({r["arm"] for r in results["sweep"]})

    def decode(arm, ctx, batch="1"):
        point = sweep.get((arm, ctx), {}).get("decode", {}).get(batch, {})
        return point.get("ms_per_token")

    def cache(arm, ctx, batch="1"):
        return sweep.get((arm, ctx), {}).get("decode", {}).get(batch, {}).get("cache_mb")

    def prefill(arm, ctx):
        return sweep.get((arm, ctx), {}).get("prefill_s")

    ratios = []
    for ctx in contexts:
        row = {"context": ctx}
        for batch in ("1", "8"):
            m, t = decode("ml-mamba", ctx, batch), decode("llava", ctx, batch)
            row[f"decode_llava_over_mlmamba_b{batch}"] = t / m if m and t else None
            h = decode("ml-mamba-hf", ctx, batch)
            row[f"decode_hf_over_fast_b{batch}"] = h / m if m and h else None
        m, t, h = prefill("ml-mamba", ctx), prefill("llava", ctx), prefill("ml-mamba-hf", ctx)
        row["prefill_llava_over_mlmamba"] = t / m if m and t else None
        row["prefill_hf_over_fast"] = h / m if m and h else None
        ratios.append(row)

    goals = []
    small, large = (contexts[0], contexts[-1]) if contexts else (None, None)
    if "ml-mamba" in arms and small is not None:
        flat = decode("ml-mamba", large) / decode("ml-mamba", small)
        goals.append({"goal": f"ML-Mamba decode ms/token at {large} within 1.2x of its own at {small}",
                      "value": f"{flat:.2f}x", "met": flat <= 1.2})
        same = abs(cache("ml-mamba", large) - cache("ml-mamba", small)) < 1e-9
        goals.append({"goal": f"ML-Mamba decode cache the same at {small} and {large}",
                      "value": f"{cache('ml-mamba', small):.2f} MB vs {cache('ml-mamba', large):.2f} MB"
                               + (f" (llava: {cache('llava', small):.1f} -> {cache('llava', large):.1f} MB)"
                                  if cache("llava", large) else ""),
                      "met": same})
    if {"ml-mamba", "llava"} <= set(arms) and large is not None:
        speedup = decode("llava", large) / decode("ml-mamba", large)
        goals.append({"goal": f">= 2.5x faster per token than the transformer at {large} (batch 1)",
                      "value": f"{speedup:.2f}x", "met": speedup >= 2.5})
        from_4k = [c for c in contexts if c >= 4096]
        if from_4k:
            values = {c: prefill("llava", c) / prefill("ml-mamba", c) for c in from_4k}
            goals.append({"goal": "prefill faster than the transformer's from 4k on",
                          "value": ", ".join(f"{c}: {v:.2f}x" for c, v in values.items()),
                          "met": all(v > 1 for v in values.values())})
    if "ml-mamba" in arms and len(contexts) >= 2:
        extra = {c: sweep[("ml-mamba", c)]["peak_rss_prefill_mb"] - sweep[("ml-mamba", c)]["rss_model_mb"]
                 for c in contexts if ("ml-mamba", c) in sweep}
        per_token = {c: 1e3 * v / c for c, v in extra.items()}  # KB per context token
        linear = extra[large] <= (large / contexts[-2]) * max(extra[contexts[-2]], 1.0) * 1.25
        goals.append({"goal": "prefill peak memory (above the model) linear in the context",
                      "value": ", ".join(f"{c}: +{extra[c]:.0f} MB ({per_token[c]:.1f} KB/token)" for c in extra),
                      "met": linear})
    return {"ratios": ratios, "goals": goals}


def markdown(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    lines = [f"Command: `{meta['command']}`  ",
             f"{meta['date']}; {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, transformers "
             f"{meta['transformers']}; float32, random weights; load average {meta['load_before']} before, "
             f"{meta['load_after']} after.", ""]
    if results["sweep"]:
        params = {r["arm"]: r["params"] for r in results["sweep"]}
        lines += ["| arm | LM params | total params |", "|---|---:|---:|"]
        lines += [f"| {arm} | {p['language_model'] / 1e6:.1f} M | {p['total'] / 1e6:.1f} M |" for arm, p in params.items()]
        lines += ["", "**Decode** (greedy, one token per cached forward; median ms per step; tokens/s counts all "
                      "sequences of the batch):", "",
                  "| context | arm | b1 ms/token | b1 tok/s | b8 ms/step | b8 tok/s | cache b1 MB | cache b8 MB "
                  "| peak RSS b1 MB | peak RSS b8 MB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(results["sweep"], key=lambda r: (r["context"], r["arm"])):
            d1, d8 = r["decode"]["1"], r["decode"].get("8", {})
            if "skipped" in d8:
                b8 = [d8["skipped"], "-", "-", "-"]
            else:
                b8 = [_fmt(d8.get("ms_per_token")), _fmt(d8.get("tokens_per_s")), _fmt(d8.get("cache_mb"), 2),
                      _fmt(d8.get("peak_rss_mb"), 0)]
            lines.append(f"| {r['context']} | {r['arm']} | {_fmt(d1['ms_per_token'])} | {_fmt(d1['tokens_per_s'])} "
                         f"| {b8[0]} | {b8[1]} | {_fmt(d1['cache_mb'], 2)} | {b8[2]} | {_fmt(d1['peak_rss_mb'], 0)} "
                         f"| {b8[3]} |")
        lines += ["", "**Prefill** (batch 1, median of the runs; peak RSS during prefill vs RSS of the built model; "
                      "load = the machine's 1-minute load average when the point finished, 2 = both cores busy):",
                  "", "| context | arm | prefill s | tokens/s | peak RSS MB | model RSS MB | runs | load |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(results["sweep"], key=lambda r: (r["context"], r["arm"])):
            lines.append(f"| {r['context']} | {r['arm']} | {r['prefill_s']:.2f} | {r['context'] / r['prefill_s']:,.0f} "
                         f"| {r['peak_rss_prefill_mb']:.0f} | {r['rss_model_mb']:.0f} | {len(r['prefill_runs'])} "
                         f"| {r.get('load_after', float('nan')):.1f} |")
        lines += ["", "**Ratios** (> 1 means ML-Mamba's fast path is faster):", "",
                  "| context | decode llava/ml-mamba b1 | b8 | prefill llava/ml-mamba | decode hf/fast b1 | b8 "
                  "| prefill hf/fast |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in summary["ratios"]:
            lines.append("| {context} | {a} | {b} | {c} | {d} | {e} | {f} |".format(
                context=row["context"], a=_fmt(row["decode_llava_over_mlmamba_b1"], 2),
                b=_fmt(row["decode_llava_over_mlmamba_b8"], 2), c=_fmt(row["prefill_llava_over_mlmamba"], 2),
                d=_fmt(row["decode_hf_over_fast_b1"], 2), e=_fmt(row["decode_hf_over_fast_b8"], 2),
                f=_fmt(row["prefill_hf_over_fast"], 2)))
    if results["e2e"]:
        lines += ["", "**End to end** (one 384x384 image, prompt, 256 new tokens, greedy `generate`; tokens/s = "
                      "new tokens / total time, the papers' Evalavg):", "",
                  "| arm | image tokens | prompt tokens | new tokens | time to first token s | of which image encoding s "
                  "| total s | tok/s | decode tok/s | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["e2e"]:
            lines.append(f"| {r['arm']} | {r['image_tokens']} | {r['prompt_tokens']} | {r['new_tokens']} "
                         f"| {r['ttft_s']:.2f} | {_fmt(r.get('image_encode_s'), 2)} | {r['total_s']:.2f} | {r['tokens_per_s']:.1f} "
                         f"| {r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
        e2e = {r["arm"]: r for r in results["e2e"]}
        if "ml-mamba" in e2e and "llava" in e2e:
            lines.append(f"\nEnd to end, ml-mamba / llava tokens/s: "
                         f"{e2e['ml-mamba']['tokens_per_s'] / e2e['llava']['tokens_per_s']:.2f}x")
    if summary["goals"]:
        lines += ["", "**Goals** (issue 6, CPU):", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in summary["goals"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import vlm_pair

    colors = {"ml-mamba": "tab:green", "ml-mamba-hf": "tab:olive", "llava": "tab:red"}
    widths = {"ml-mamba": 3.0, "ml-mamba-hf": 1.2, "llava": 2.0}  # the hf arm shares ML-Mamba's cache line
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for arm in sorted({r["arm"] for r in results["sweep"]}, key=lambda a: -widths.get(a, 1.0)):
        rows = sorted((r for r in results["sweep"] if r["arm"] == arm), key=lambda r: r["context"])
        contexts = [r["context"] for r in rows]
        style = dict(color=colors.get(arm), linewidth=widths.get(arm, 1.5), markersize=2 + 2 * widths.get(arm, 1.5))
        for batch, line in (("1", "-o"), ("8", "--s")):
            points = [(c, r["decode"].get(batch, {}).get("ms_per_token")) for c, r in zip(contexts, rows)]
            points = [(c, v) for c, v in points if v is not None]
            if points:
                axes[0].plot(*zip(*points), line, label=f"{arm}, batch {batch}", **style)
                cache_points = [(c, r["decode"][batch]["cache_mb"]) for c, r in zip(contexts, rows)
                                if "cache_mb" in r["decode"].get(batch, {})]
                axes[1].plot(*zip(*cache_points), line, label=f"{arm}, batch {batch}", **style)
        axes[2].plot(contexts, [r["prefill_s"] for r in rows], "-o", label=arm, **style)
    titles = ("decode ms per step (batch 1: per token)", "cache held between steps (MB)",
              "prefill seconds (batch 1)")
    meta = results["meta"]
    vlm_pair.finish_log_plot(figure, axes, titles, "context tokens (image + prompt)",
                             f"ML-Mamba vs LLaVA (Llama), matched {meta['lm_params_m']} M-parameter LMs, CPU "
                             f"{meta['threads']} threads, float32", path, legend_size=7)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="s", help="model pair size from vlm_pair.SIZES (s, tiny)")
    parser.add_argument("--arms", nargs="+", default=["ml-mamba", "llava", "ml-mamba-hf"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], choices=[1, 8])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--prefill-budget-s", type=float, default=45.0,
                        help="stop repeating a prefill once this much time was spent on it")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "vlm_s"),
                        help="path prefix of the .json/.md/.png outputs")
    parser.add_argument("--worker-timeout-s", type=float, default=3600)
    parser.add_argument("--worker", choices=["sweep", "e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        sys.path.insert(0, HERE)
        print(json.dumps(worker_sweep(args) if args.worker == "sweep" else worker_e2e(args)))
        return None

    import torch
    import transformers
    from tqdm.auto import tqdm

    sys.path.insert(0, HERE)
    import vlm_pair

    cpu = vlm_pair.cpu_name()
    meta = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__, "size": args.size,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    results = {"meta": meta, "sweep": [], "e2e": []}
    jobs = [] if args.no_sweep else [("sweep", {"arm": arm, "context": ctx}) for ctx in args.contexts for arm in args.arms]
    jobs += [] if args.no_e2e else [("e2e", {"arm": arm}) for arm in args.arms]
    for kind, fields in tqdm(jobs, desc="benchmark points", unit="point"):
        tqdm.write(f"{kind} {fields} ...")
        results[kind].append(_run_worker(kind, args, **fields))
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    any_result = (results["sweep"] or results["e2e"] or [{}])[0]
    meta["lm_params_m"] = round(any_result.get("params", {}).get("language_model", 0) / 1e6, 1)
    results["summary"] = summarize(results)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as handle:
        json.dump(results, handle, indent=2)
    table = markdown(results)
    with open(args.output + ".md", "w") as handle:
        handle.write(table)
    if results["sweep"]:
        plot(results, args.output + ".png")
    print(table)
    print(f"wrote {args.output}.json, .md" + (", .png" if results["sweep"] else ""))
    return results


if __name__ == "__main__":
    main()
