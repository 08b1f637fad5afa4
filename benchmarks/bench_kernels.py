"""Our PyTorch kernels vs transformers' own PyTorch fallback of Mamba-2, on CPU, at the benchmark model's shapes.

    python benchmarks/bench_kernels.py

* SSD prefill, one layer (24 heads x 64, state 128, 1 group): `ssd_chunked` vs transformers' `mamba2_chunk_scan`
  (at the config's chunk 256 and at our CPU chunk), for 1k, 4k and 16k tokens;
* decode, one mixer layer with a prefilled `DynamicCache`: `FastMamba2Mixer` vs `Mamba2Mixer` (which calls
  `causal_conv1d_update` + `mamba2_selective_state_update`), batch 1 and 8;
* the scan connector's mixer on 729 visual tokens (bidirectional and cross scans): ours (all directions in one
  scan) vs the same mixer computed one direction at a time with transformers' `causal_conv1d_fn` +
  `mamba2_chunk_scan`, forward and forward + backward.

Every row also reports the largest difference between the two outputs, relative to the largest output value. Measurements alternate between the two
implementations and report medians, so slow drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from transformers import DynamicCache, Mamba2Config

from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME, Mamba2Mixer, causal_conv1d_fn, mamba2_chunk_scan
from modeling_ml_mamba.ml_mamba_fast_mamba2 import CPU_CHUNK_SIZE, enable_fast_mamba2
from modeling_ml_mamba.ml_mamba_scan import MultiScanMamba2Mixer, scan_orders
from modeling_ml_mamba.ml_mamba_ssd import ssd_chunked

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS, HEAD_DIM, STATE, HIDDEN = 24, 64, 128, 768


def _median(values):
    return sorted(values)[len(values) // 2]


def alternate(functions: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calling them in turn (after one warm-up call each)."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: _median(values) for name, values in times.items()}


def ssd_inputs(length: int, seed: int = 0):
    """Inputs at the shapes and scales of a Mamba-2 layer at initialisation (A = -1..-24, dt from dt_bias)."""
    generator = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(HEADS, generator=generator) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    return dict(x=torch.randn(1, length, HEADS, HEAD_DIM, generator=generator),
                dt=torch.randn(1, length, HEADS, generator=generator),
                A=-torch.arange(1, HEADS + 1, dtype=torch.float32),
                B=torch.randn(1, length, 1, STATE, generator=generator),
                C=torch.randn(1, length, 1, STATE, generator=generator),
                D=torch.ones(HEADS), dt_bias=dt + torch.log(-torch.expm1(-dt)))


def bench_ssd(lengths, repeats):
    rows = []
    for length in lengths:
        inputs = ssd_inputs(length)
        outputs = {}

        def ours():
            outputs["ours"] = ssd_chunked(**inputs, chunk_size=CPU_CHUNK_SIZE, dt_softplus=True, return_final_state=True)

        def theirs(chunk):
            def run():
                outputs[f"hf{chunk}"] = mamba2_chunk_scan(
                    inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk, D=inputs["D"],
                    dt_bias=inputs["dt_bias"], dt_softplus=True, return_final_states=True)
            return run

        with torch.no_grad():
            times = alternate({"ours": ours, "hf256": theirs(256), f"hf{CPU_CHUNK_SIZE}": theirs(CPU_CHUNK_SIZE)},
                              repeats if length <= 4096 else max(1, repeats // 2))
        diff = max(((outputs["ours"][i] - outputs["hf256"][i]).abs().max() / outputs["hf256"][i].abs().max()).item()
                   for i in (0, 1))
        rows.append({"kernel": "SSD prefill (1 layer)", "size": f"{length} tokens", "ours_ms": 1e3 * times["ours"],
                     "transformers_ms": 1e3 * times["hf256"],
                     "transformers_same_chunk_ms": 1e3 * times[f"hf{CPU_CHUNK_SIZE}"], "max_abs_diff": diff})
    return rows


def bench_decode(batches, steps):
    rows = []
    config = Mamba2Config(hidden_size=HIDDEN, num_hidden_layers=1, num_heads=HEADS, head_dim=HEAD_DIM,
                          state_size=STATE, n_groups=1, expand=2, chunk_size=256)
    torch.manual_seed(0)
    reference = Mamba2Mixer(config, layer_idx=0).eval()
    fast = copy.deepcopy(reference)
    enable_fast_mamba2(fast)
    for batch in batches:
        caches = {"hf": DynamicCache(config=config), "ours": DynamicCache(config=config)}
        prompt = torch.randn(batch, 64, HIDDEN)
        token = torch.randn(batch, 1, HIDDEN)
        outputs = {"hf": [], "ours": []}
        with torch.no_grad():
            reference(prompt, **{CACHE_NAME: caches["hf"]})
            fast(prompt, **{CACHE_NAME: caches["ours"]})

            def step(name, mixer):
                return lambda: outputs[name].append(mixer(token, **{CACHE_NAME: caches[name]}))

            times = alternate({"hf": step("hf", reference), "ours": step("ours", fast)}, steps)
        diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(outputs["hf"], outputs["ours"]))
        rows.append({"kernel": "decode step (1 mixer layer)", "size": f"batch {batch}", "ours_ms": 1e3 * times["ours"],
                     "transformers_ms": 1e3 * times["hf"], "max_abs_diff": diff})
    return rows


def per_direction_with_transformers(mixer: MultiScanMamba2Mixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """The connector mixer built from transformers' torch fallback functions, one direction at a time."""
    batch, length, _ = hidden_states.shape
    gate, xbc, dt = mixer.in_proj(hidden_states).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], -1)
    merged = 0
    for direction, order in zip(mixer.directions, scan_orders(mixer.scan, length)):
        conv = causal_conv1d_fn(xbc[:, order].transpose(1, 2), direction.conv1d.weight.squeeze(1),
                                direction.conv1d.bias, activation="silu").transpose(1, 2)
        x, B, C = conv.split([mixer.intermediate_size, mixer.n_groups * mixer.state_size,
                              mixer.n_groups * mixer.state_size], -1)
        y = mamba2_chunk_scan(x.reshape(batch, length, mixer.num_heads, mixer.head_dim), dt[:, order],
                              -torch.exp(direction.A_log.float()),
                              B.reshape(batch, length, mixer.n_groups, mixer.state_size),
                              C.reshape(batch, length, mixer.n_groups, mixer.state_size), mixer.chunk_size,
                              D=direction.D, dt_bias=direction.dt_bias, dt_softplus=True)
        y = y.reshape(batch, length, -1)[:, torch.argsort(order)]
        merged = merged + mixer.norm(y, gate)
    return mixer.out_proj(merged / len(mixer.directions))


def bench_connector(repeats, tokens=729):
    rows = []
    for scan in ("bidirectional", "cross"):
        torch.manual_seed(0)
        mixer = MultiScanMamba2Mixer(HIDDEN, scan=scan, state_size=STATE, head_dim=HEAD_DIM, chunk_size=256)
        for direction in mixer.directions:
            direction.reset_ssm_parameters()
        hidden = torch.randn(1, tokens, HIDDEN)
        with torch.no_grad():
            reference = per_direction_with_transformers(mixer, hidden)
            diff = ((mixer(hidden) - reference).abs().max() / reference.abs().max()).item()
            times = alternate({"ours": lambda: mixer(hidden),
                               "hf": lambda: per_direction_with_transformers(mixer, hidden)}, repeats)
        rows.append({"kernel": f"scan connector mixer, {scan}, forward", "size": f"{tokens} tokens",
                     "ours_ms": 1e3 * times["ours"], "transformers_ms": 1e3 * times["hf"], "max_abs_diff": diff})
        leaf = hidden.clone().requires_grad_()
        times = alternate({"ours": lambda: mixer(leaf).sum().backward(),
                           "hf": lambda: per_direction_with_transformers(mixer, leaf).sum().backward()},
                          max(1, repeats // 2))
        rows.append({"kernel": f"scan connector mixer, {scan}, forward + backward", "size": f"{tokens} tokens",
                     "ours_ms": 1e3 * times["ours"], "transformers_ms": 1e3 * times["hf"], "max_abs_diff": None})
    return rows


def markdown(rows, meta) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"{meta['threads']} threads, torch {meta['torch']}, float32; "
             f"load average {meta['load_before']} before, {meta['load_after']} after.", "",
             "| kernel | size | ours ms | transformers ms | speed-up | transformers at our chunk ms | max rel. diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        same_chunk = row.get("transformers_same_chunk_ms")
        diff = row["max_abs_diff"]
        lines.append(f"| {row['kernel']} | {row['size']} | {row['ours_ms']:.2f} | {row['transformers_ms']:.2f} | "
                     f"{row['transformers_ms'] / row['ours_ms']:.1f}x | "
                     f"{'-' if same_chunk is None else f'{same_chunk:.2f}'} | {'-' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "kernels"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import sys

    meta = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
            "threads": args.threads, "torch": torch.__version__,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    rows = bench_ssd(args.lengths, args.repeats) + bench_decode(args.batches, args.decode_steps)
    rows += bench_connector(args.repeats)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    table = markdown(rows, meta)
    with open(args.output + ".md", "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
