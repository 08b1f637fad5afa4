"""The int8 matrix-vector products a decode step can use, over the weights of the benchmark's 129M Mamba-2 LM.

    python benchmarks/bench_gemv.py   # ~2 min on 2 cores -> benchmarks/results/gemv.{json,md}

One pass multiplies ``rows`` activation rows by each of the LM's 49 int8 weights (24 in / out projection pairs and
the LM head), one after another, as a decode step does. Compared per pass (median of ``--repeats``, the variants
alternating so that drift on a shared machine hits all alike):

* ``int8 activations (<isa>)``: our kernel (`ml_mamba_cpu_kernels`), activations quantized to int8 per block of 32,
  for every instruction set this CPU has (AVX-512 VNNI, AVX2, portable C);
* ``_weight_int8pack_mm``: PyTorch's int8 weight-only CPU kernel, bfloat16 activations (torchao's path);
* ``compiled fused reduction``: ``(x[:, None, :] * W).sum(-1) * scale`` under `torch.compile` (what `project` runs
  for int8 layers with bfloat16 activations inside the compiled decode step).

GB/s counts the int8 weight bytes read per pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vlm_pair import build_model, cpu_name, load_average, run_meta, write_report  # noqa: E402

from modeling_ml_mamba.ml_mamba_cpu_kernels import int8_gemv, supported_isas  # noqa: E402
from modeling_ml_mamba.ml_mamba_quant import quantize_int8  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def int8_layers(size: str) -> list:
    model = build_model("ml-mamba", size=size).eval()
    quantize_int8(model)
    return [m for m in model.modules() if hasattr(m, "weight_int8")]


def fused_pass(weights: list, scales: list, xs: list) -> list:
    return [((x.float()[:, None, :] * w.float()).sum(-1) * s.float()) for w, s, x in zip(weights, scales, xs)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="s")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gemv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = int8_layers(args.size)
    weights, scales = [m.weight_int8 for m in layers], [m.scale for m in layers]
    weight_bytes = sum(w.numel() for w in weights)
    meta = run_meta(args.threads, weight_bytes=weight_bytes, layers=len(layers))
    fused = torch.compile(fused_pass, fullgraph=True, dynamic=False)
    pack_mm = torch.ops.aten._weight_int8pack_mm
    rows_out = []
    for rows in args.rows:
        torch.manual_seed(rows)
        xs = [torch.randn(rows, w.shape[1]) for w in weights]
        variants = {f"int8 activations ({isa})": (lambda isa=isa: [int8_gemv(x, w, s, isa=isa)
                                                                    for x, w, s in zip(xs, weights, scales)])
                    for isa in supported_isas()}
        variants["_weight_int8pack_mm"] = lambda: [pack_mm(x.bfloat16(), w, s) for x, w, s in zip(xs, weights, scales)]
        variants["compiled fused reduction"] = lambda: fused(weights, scales, [x.bfloat16() for x in xs])
        times = {name: [] for name in variants}
        for name, run in variants.items():  # warm-up (and compile)
            run()
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            seconds = statistics.median(values)
            rows_out.append({"rows": rows, "variant": name, "ms_per_pass": seconds * 1e3,
                             "weight_GBps": weight_bytes / seconds / 1e9})
            print(rows_out[-1], flush=True)
    table = [f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {len(layers)} int8 weights, "
             f"{weight_bytes / 1e6:.1f} MB; load {meta['load_before']} before, {load_average()} after", "",
             "| rows | variant | ms per pass | weight GB/s |", "|---:|---|---:|---:|"]
    table += [f"| {r['rows']} | {r['variant']} | {r['ms_per_pass']:.2f} | {r['weight_GBps']:.1f} |" for r in rows_out]
    write_report(args.output, {"meta": meta, "rows": rows_out}, "\n".join(table) + "\n")
    return rows_out


if __name__ == "__main__":
    main()
