"""The GPU check (issue 14): every CUDA code path of the package in one prepared run, written out step by step.

    bash benchmarks/gpu_check.sh                                  # on the GPU machine (see the script)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check  # the same steps on CPU, tiny shapes (CI runs it)

Steps, each timed; a step that fails is recorded with its error and the next one runs. After every step the results
so far are written to ``<out>/results.json`` and ``<out>/results.md``, so a run cut off by its time limit still
returns everything it finished.

1. ``environment``: versions, the device, which kernels are importable (mamba-ssm's Triton SSD, causal-conv1d),
   the measured copy bandwidth.
2. ``equality``: each fast path in float32 and bfloat16 on the device against the float32 PyTorch reference on CPU
   (transformers' own Mamba modules, the sequential SSD recurrence): the SSD scan, the LM forward of a Mamba-2 and
   a Mamba-1 model, the scan connector (BSM and CSM), prefill + cached steps vs the full forward, a left-padded
   batch vs each prompt alone, and the static / CUDA-graph / compiled decode steps vs the eager one.
3. ``training``: 20 `SFTTrainer` steps (bfloat16 on a GPU) on the digits task, with and without LoRA: the loss
   must fall.
4. ``speed``: the 2.7B shapes (`ml-mamba-2.7b`, `cobra-3.5b` presets, random bfloat16 weights) against a
   same-size LLaVA (Llama) from transformers' classes: prefill, decode tokens/s at batch 1 and 8 after 1k and 16k
   tokens, the papers' end to end (729 image tokens + 256 new tokens), peak `max_memory_allocated`.

The dry run swaps the 2.7B shapes for tiny ones and 1k / 16k for 64 / 256 tokens; everything else is the same code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# Tolerances: max |candidate - reference| / max |reference| over the compared tensor.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2}
STEPS = ("environment", "equality", "training", "speed")
# Parameters kept in float32 in a bfloat16 model (as `from_pretrained(dtype=torch.bfloat16)` keeps them).
FLOAT32_PARAMETERS = re.compile(r"(A_log|dt_bias|(^|\.)D$|mixer\.norm\.)")


class Report:
    """The results so far, rewritten to ``out/results.{json,md}`` after every step."""

    def __init__(self, out: str, meta: dict):
        self.out, self.meta, self.steps = out, meta, {}
        os.makedirs(out, exist_ok=True)

    def record(self, step: str, result: dict) -> None:
        self.steps[step] = result
        with open(os.path.join(self.out, "results.json"), "w") as handle:
            json.dump({"meta": self.meta, "steps": self.steps}, handle, indent=1, default=str)
        with open(os.path.join(self.out, "results.md"), "w") as handle:
            handle.write(markdown(self.meta, self.steps))
        status = "ok" if result.get("ok") else ("skipped" if result.get("skipped") else "FAILED")
        print(f"[gpu_check] {step}: {status} in {result.get('seconds', 0):.1f} s", flush=True)


def markdown(meta: dict, steps: dict) -> str:
    lines = [f"# GPU check ({'dry run on CPU' if meta['dry_run'] else meta.get('device_name', '')})", "",
             f"`{meta['command']}`  ", f"{meta['date']}; {meta['machine']}; python {meta['python']}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}", ""]
    for name, result in steps.items():
        status = "ok" if result.get("ok") else ("skipped" if result.get("skipped") else "**failed**")
        lines += [f"## {name}: {status} ({result.get('seconds', 0):.1f} s)", ""]
        if result.get("error"):
            lines += ["```", result["error"].strip()[-2000:], "```", ""]
        if result.get("skipped"):
            lines += [str(result["skipped"]), ""]
        if name == "environment" and "info" in result:
            lines += [f"- {key}: {value}" for key, value in result["info"].items()] + [""]
        for table in ("checks", "runs", "points", "end_to_end"):
            rows = result.get(table)
            if rows:
                keys = list(dict.fromkeys(key for row in rows for key in row))
                lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows] + [""]
        if result.get("goals"):
            lines += ["| goal | measured | met |", "|---|---|---|"]
            lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:,.3f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args, **kwargs):
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - start


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    candidate, reference = candidate.detach().float().cpu(), reference.detach().float().cpu()
    return float((candidate - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype``, keeping the SSM parameters and gated norms in float32 (`FLOAT32_PARAMETERS`)."""
    model.to(dtype)
    if dtype != torch.float32:
        for name, parameter in model.named_parameters():
            if FLOAT32_PARAMETERS.search(name):
                parameter.data = parameter.data.float()
    return model


# ------------------------------------------------------------------------------------------------- 1. environment
def step_environment(device: torch.device, dry_run: bool) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "device": str(device)}
    for name in ("huggingface_hub", "trl", "peft", "accelerate", "datasets", "pyarrow", "numpy", "triton",
                 "mamba_ssm", "causal_conv1d"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except Exception as error:  # noqa: BLE001 - a missing or broken package is a finding, not a failure
            info[name] = f"absent ({type(error).__name__})"
    from modeling_ml_mamba import ml_mamba_scan, ml_mamba_ssd

    info["triton_ssd_kernel"] = ml_mamba_ssd.mamba_chunk_scan_combined is not None and device.type == "cuda"
    info["causal_conv1d_kernel"] = ml_mamba_scan.causal_conv1d_fn is not None and device.type == "cuda"
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                    multiprocessors=properties.multi_processor_count)
    size = (64 if dry_run else 2048) * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = [timed(device, target.copy_, source)[1] for _ in range(5)]
    info["copy_bandwidth_gb_s"] = round(2 * size / sorted(times)[2] / 1e9, 1)  # bytes read + written
    return {"ok": True, "info": info}


# ---------------------------------------------------------------------------------------------------- 2. equality
def _tiny_model(text: str, connector: str = "msc", scan: str = "bidirectional", seed: int = 0):
    """(model, processor): a tiny random ML-Mamba (Mamba-2 LM) or Cobra-style (Mamba-1 LM) model, float32, CPU."""
    from transformers import SiglipImageProcessor

    import vlm_pair
    from modeling_ml_mamba import MLMambaForConditionalGeneration, MLMambaProcessor, preset_config

    text_config = None
    if text == "mamba":
        text_config = dict(model_type="mamba", hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                           conv_kernel=4, vocab_size=320, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0)
    overrides = dict(connector_type=connector, connector_scan=scan, initializer_range=0.1)
    if text_config:
        overrides["text_config"] = text_config
    tokenizer = vlm_pair.tokenizer()
    config = preset_config("tiny", tokenizer=tokenizer, **overrides)
    torch.manual_seed(seed)
    model = MLMambaForConditionalGeneration(config).eval()
    processor = MLMambaProcessor.from_config(config, tokenizer, image_processor=SiglipImageProcessor(
        size={"height": config.image_size, "width": config.image_size}))
    return model, processor


def _prompts(processor, count: int = 3):
    import numpy as np
    from PIL import Image

    side = processor.image_processor.size["height"]
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(count)]
    texts = ["<image>Describe the picture.", "<image>What is in it? Answer briefly.", "<image>Why?"][:count]
    return images, texts


def _check(name: str, dtype: torch.dtype, error: float, tolerance: float, seconds: float, **extra) -> dict:
    return {"check": name, "dtype": str(dtype).replace("torch.", ""), "error": error, "tolerance": tolerance,
            "ok": bool(error <= tolerance), "seconds": round(seconds, 2), **extra}


def step_equality(device: torch.device, dry_run: bool) -> dict:
    import copy

    from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME
    from modeling_ml_mamba.ml_mamba_fast_mamba2 import enable_fast_mamba2
    from modeling_ml_mamba.ml_mamba_scan import MultiScanMamba2Mixer
    from modeling_ml_mamba.ml_mamba_ssd import ssd_scan, ssd_sequential

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in these checks
    torch.backends.cudnn.allow_tf32 = False
    checks = []
    dtypes = (torch.float32, torch.bfloat16)

    # The SSD scan (mamba-ssm's Triton kernel on CUDA when installed, else the chunked PyTorch scan) vs the recurrence.
    generator = torch.Generator().manual_seed(0)
    b, length, heads, head_dim, groups, state = 2, 200, 4, 16, 1, 16
    x = torch.randn(b, length, heads, head_dim, generator=generator)
    dt = torch.randn(b, length, heads, generator=generator) - 2
    A = -torch.rand(heads, generator=generator) * 4 - 0.5
    B = torch.randn(b, length, groups, state, generator=generator)
    C = torch.randn(b, length, groups, state, generator=generator)
    D, dt_bias = torch.randn(heads, generator=generator), torch.randn(heads, generator=generator) * 0.1
    reference = ssd_sequential(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)
    for dtype in dtypes:
        args = [t.to(device) for t in (x.to(dtype), dt.to(dtype), A, B.to(dtype), C.to(dtype))]
        out, seconds = timed(device, ssd_scan, *args, 64, D=D.to(device), dt_bias=dt_bias.to(device))
        checks.append(_check("SSD scan vs sequential recurrence", dtype, relative_error(out, reference),
                             TOLERANCE[dtype], seconds))

    # The scan connector's mixer (all directions in one conv + scan) in BSM and CSM order.
    for scan in ("bidirectional", "cross"):
        torch.manual_seed(0)
        mixer = MultiScanMamba2Mixer(64, scan=scan, state_size=16, head_dim=16, chunk_size=16).eval()
        for direction in mixer.directions:  # (a model's `_init_weights` does this)
            direction.reset_ssm_parameters()
        features = torch.randn(2, 49, 64)
        with torch.no_grad():
            reference = mixer(features)
            for dtype in dtypes:
                candidate = to_dtype(copy.deepcopy(mixer), dtype).to(device)
                out, seconds = timed(device, candidate, features.to(device, dtype))
                checks.append(_check(f"scan connector mixer ({'BSM' if scan == 'bidirectional' else 'CSM'})", dtype,
                                     relative_error(out, reference), TOLERANCE[dtype], seconds))

    for text in ("mamba2", "mamba"):
        model, processor = _tiny_model(text)
        images, texts = _prompts(processor)
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        reference_model = copy.deepcopy(model)
        enable_fast_mamba2(reference_model, enabled=False)  # transformers' own Mamba-2 modules: the reference
        with torch.no_grad():
            reference = reference_model(**inputs).logits
        label = "Mamba-2 (ML-Mamba)" if text == "mamba2" else "Mamba-1 (Cobra)"
        for dtype in dtypes:
            candidate = to_dtype(copy.deepcopy(model), dtype).to(device)
            # new tensors (BatchFeature.to moves in place), the pixels in the model's dtype
            device_inputs = {key: value.to(device) for key, value in inputs.items()}
            device_inputs["pixel_values"] = device_inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out, seconds = timed(device, lambda: candidate(**device_inputs).logits)
                mask = inputs["attention_mask"].bool()
                checks.append(_check(f"{label} forward", dtype, relative_error(out.cpu()[mask], reference[mask]),
                                     TOLERANCE[dtype], seconds))

                # prefill of all but the last 4 tokens, then 4 cached one-token steps, vs the full forward
                start = time.perf_counter()
                cut = device_inputs["input_ids"].shape[1] - 4
                prefix = {key: (value[:, :cut] if key in ("input_ids", "attention_mask") else value)
                          for key, value in device_inputs.items()}
                step = candidate(**prefix, use_cache=True)
                cache, steps = getattr(step, CACHE_NAME), []
                for position in range(cut, cut + 4):
                    step = candidate(input_ids=device_inputs["input_ids"][:, position:position + 1], use_cache=True,
                                     attention_mask=device_inputs["attention_mask"][:, :position + 1],
                                     **{CACHE_NAME: cache})
                    steps.append(step.logits[:, -1])
                synchronize(device)
                checks.append(_check(f"{label} prefill + 4 cached steps vs full forward", dtype,
                                     relative_error(torch.stack(steps, 1), out[:, cut:]), TOLERANCE[dtype],
                                     time.perf_counter() - start))

            # generated tokens: the decode implementations, and a left-padded batch vs each prompt alone
            generate = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
            candidate.config.decode_implementation = "eager"
            eager = candidate.generate(**device_inputs, **generate)
            for implementation in ("static", "graph", "compiled"):
                if implementation == "compiled" and not (dry_run or device.type == "cuda"):
                    continue
                candidate.config.decode_implementation = implementation
                got, seconds = timed(device, candidate.generate, **device_inputs, **generate)
                error = max(relative_error(a, b) for a, b in zip(got.logits, eager.logits))
                agree = float((got.sequences == eager.sequences).float().mean())
                checks.append(_check(f"{label} generate: {implementation} step vs eager", dtype, error,
                                     TOLERANCE[dtype], seconds, tokens_agree=agree))
            candidate.config.decode_implementation = "graph" if device.type == "cuda" else "static"
            batched = candidate.generate(**device_inputs, **generate)
            alone_logits, start = [], time.perf_counter()
            for row in range(len(texts)):
                single = processor(images=images[row:row + 1], text=texts[row:row + 1], return_tensors="pt").to(device)
                single["pixel_values"] = single["pixel_values"].to(dtype)
                alone_logits.append(torch.stack(candidate.generate(**single, **generate).logits, 1)[0])
            error = max(relative_error(torch.stack(batched.logits, 1)[row], alone) for row, alone in
                        enumerate(alone_logits))
            checks.append(_check(f"{label} left-padded batch vs one by one", dtype, error, TOLERANCE[dtype],
                                 time.perf_counter() - start))
            del candidate
    return {"ok": all(check["ok"] for check in checks), "checks": checks}


# ---------------------------------------------------------------------------------------------------- 3. training
def step_training(device: torch.device, dry_run: bool, steps: int = 20) -> dict:
    from peft import LoraConfig

    from ml_mamba.training.arguments import LORA_TARGETS, MLMambaSFTConfig
    from ml_mamba.training.digits_demo import DemoSettings, demo_model, demo_tokenizer, split_digits, training_dataset
    from ml_mamba.training.train import build_trainer

    images, labels, train_idx, _ = split_digits(0.2, 0)
    dataset = training_dataset(images, labels, train_idx[:200], seed=0)
    runs = []
    for lora in (False, True):
        model, processor = demo_model(demo_tokenizer(), DemoSettings())
        peft_config = None
        if lora:
            peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                     target_modules=LORA_TARGETS["language_model"],
                                     modules_to_save=["vision_tower", "connector"], task_type="CAUSAL_LM")
        args = MLMambaSFTConfig(
            output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpu-check-sft"), max_steps=steps,
            per_device_train_batch_size=32, learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to="none", seed=0, use_cpu=device.type != "cuda",
            bf16=device.type == "cuda", dataloader_num_workers=0, disable_tqdm=True)
        trainer = build_trainer(model, processor, args, dataset, peft_config=peft_config)
        _, seconds = timed(device, trainer.train)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        runs.append({"run": "LoRA" if lora else "full", "steps": len(losses), "loss_first_5": first,
                     "loss_last_5": last, "loss_falls": bool(last < 0.9 * first), "seconds": round(seconds, 1),
                     "precision": "bf16" if device.type == "cuda" else "fp32"})
    return {"ok": all(run["loss_falls"] for run in runs), "runs": runs}


# ------------------------------------------------------------------------------------------------------- 4. speed
LLAVA_SAME_SIZE = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=20, num_key_value_heads=20,
                       intermediate_size=6912)  # ~2.67B parameters, the Mamba-2 2.7B LM's size


def _speed_models(dry_run: bool) -> list[tuple[str, callable]]:
    """(arm, builder) pairs; each builder returns a float32 model with random weights, on the current default device."""
    import vlm_pair

    if dry_run:
        return [(arm, lambda arm=arm: vlm_pair.build_model(arm, "tiny")) for arm in ("ml-mamba", "llava")] + [
            ("cobra", lambda: _tiny_model("mamba", connector="fused-mlp")[0])]

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from modeling_ml_mamba import MLMambaForConditionalGeneration, preset_config
    from modeling_ml_mamba.configuration_ml_mamba import SIGLIP_SO400M_384

    def llava():
        text = dict(model_type="llama", vocab_size=50280, max_position_embeddings=32768, tie_word_embeddings=True,
                    pad_token_id=0, bos_token_id=0, eos_token_id=0, **LLAVA_SAME_SIZE)
        config = LlavaConfig(vision_config=dict(SIGLIP_SO400M_384, vision_use_head=False), text_config=text,
                             image_token_id=50277, image_seq_length=729, vision_feature_select_strategy="full",
                             vision_feature_layer=-1, tie_word_embeddings=True)
        config._attn_implementation = "sdpa"
        return LlavaForConditionalGeneration(config)

    return [("ml-mamba-2.7b", lambda: MLMambaForConditionalGeneration(preset_config("ml-mamba-2.7b"))),
            ("cobra-3.5b", lambda: MLMambaForConditionalGeneration(preset_config("cobra-3.5b"))),
            ("llava-2.7b", llava)]


def _e2e_inputs(model, device, dtype):
    """The papers' speed prompt: one image (729 tokens at 384 px) and a short question, as input ids + pixels."""
    from transformers import LlavaForConditionalGeneration

    config = model.config
    image_token = config.image_token_id
    tokens = config.image_seq_length if isinstance(model, LlavaForConditionalGeneration) else config.num_image_tokens
    ids = torch.tensor([[1] + [image_token] * tokens + list(range(10, 34))], device=device)
    side = getattr(config, "image_size", None) or config.vision_config.image_size
    channels = 6 if getattr(config.vision_config, "model_type", "") == "ml_mamba_fused_vision" else 3
    pixels = torch.randn(1, channels, side, side, device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def step_speed(device: torch.device, dry_run: bool, deadline: float) -> dict:
    import vlm_pair

    contexts = (64, 256) if dry_run else (1024, 16384)
    new_tokens = 16 if dry_run else 256
    dtype = torch.float32 if dry_run else torch.bfloat16
    decode_steps = 8 if dry_run else 64
    points, end_to_end = [], []
    for arm, build in _speed_models(dry_run):
        if time.perf_counter() > deadline:
            points.append({"arm": arm, "skipped": "time budget spent"})
            continue
        kind = "llava" if arm.startswith("llava") else "ml-mamba"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):
                model = build()
        else:
            model = build()
        model = to_dtype(model.eval(), dtype).to(device)
        if kind == "ml-mamba":
            model.config.decode_implementation = "graph"
        mamba1 = getattr(model.config.text_config, "model_type", "") == "mamba"
        slow_mamba1 = mamba1 and device.type == "cuda" and not _has_mamba1_kernels()
        with torch.no_grad():
            inputs = _e2e_inputs(model, device, dtype)
            generate = dict(do_sample=False, pad_token_id=0)
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **generate)  # warm-up (and capture)
            _, ttft = timed(device, model.generate, **inputs, max_new_tokens=1, min_new_tokens=1, **generate)
            out, total = timed(device, model.generate, **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               **generate)
            end_to_end.append({"arm": arm, "prompt_tokens": inputs["input_ids"].shape[1],
                               "new_tokens": out.shape[1] - inputs["input_ids"].shape[1], "ttft_s": ttft,
                               "total_s": total, "tokens_per_s": new_tokens / total,
                               "peak_gib": _peak_gib(device)})
            for context in contexts:
                if time.perf_counter() > deadline:
                    points.append({"arm": arm, "context": context, "skipped": "time budget spent"})
                    continue
                if slow_mamba1 and context > 1024:
                    points.append({"arm": arm, "context": context,
                                   "skipped": "Mamba-1 prefill without mamba-ssm's kernels is a per-token loop"})
                    continue
                ids = torch.randint(5, min(1000, model.config.text_config.vocab_size), (1, context), device=device)
                embeds = model.get_input_embeddings()(ids)
                (logits, cache), prefill_s = timed(device, vlm_pair.prefill, kind, model, embeds)
                tokens = logits[:, -1:].argmax(-1)
                point = {"arm": arm, "context": context, "prefill_s": prefill_s}
                for batch in (1, 8):
                    if batch == 8:
                        cache.reorder_cache(torch.zeros(8, dtype=torch.long, device=device))
                        tokens = tokens[:1].repeat(8, 1)
                    for _ in range(3):  # warm-up (the first step of a new cache captures its graph)
                        tokens = vlm_pair.decode_step(kind, model, tokens, cache)[:, -1:].argmax(-1)
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(decode_steps):
                        tokens = vlm_pair.decode_step(kind, model, tokens, cache)[:, -1:].argmax(-1)
                    synchronize(device)
                    seconds = (time.perf_counter() - start) / decode_steps
                    point[f"b{batch}_tok_s"] = batch / seconds
                point["cache_mib"] = vlm_pair.cache_bytes(cache) / 2**20
                point["peak_gib"] = _peak_gib(device)
                points.append(point)
                del cache, logits
        del model
        gc.collect()
    return {"ok": True, "points": points, "end_to_end": end_to_end, "goals": _speed_goals(points, end_to_end, dry_run)}


def _has_mamba1_kernels() -> bool:
    """Whether mamba-ssm and causal-conv1d are installed (transformers' Mamba-1 then uses their CUDA kernels)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _speed_goals(points: list, end_to_end: list, dry_run: bool) -> list:
    """Issue 14's GPU goals, from the measured rows (reported in the dry run too, against its tiny shapes)."""
    def point(arm_prefix, context):
        for row in points:
            if row["arm"].startswith(arm_prefix) and row.get("context") == context and "b1_tok_s" in row:
                return row
        return None

    short, long = (64, 256) if dry_run else (1024, 16384)
    goals = []
    mm_short, mm_long, ll_long = point("ml-mamba", short), point("ml-mamba", long), point("llava", long)
    if mm_short:
        goals.append({"goal": "ML-Mamba decode >= 450 tok/s (batch 1, bf16)",
                      "value": f"{mm_short['b1_tok_s']:.0f} tok/s", "met": mm_short["b1_tok_s"] >= 450})
    if mm_short and mm_long:
        ratio = mm_short["b1_tok_s"] / mm_long["b1_tok_s"]
        goals.append({"goal": f"decode flat from {short} to {long} tokens (within 1.1x)", "value": f"{ratio:.2f}x",
                      "met": ratio <= 1.1})
    if mm_long and ll_long:
        for batch, target in (("b1", 3), ("b8", 4)):
            ratio = mm_long[f"{batch}_tok_s"] / ll_long[f"{batch}_tok_s"]
            goals.append({"goal": f">= {target}x LLaVA's {batch} decode at {long}", "value": f"{ratio:.2f}x",
                          "met": ratio >= target})
    for row in end_to_end:
        if row["arm"].startswith("ml-mamba"):
            goals.append({"goal": "end to end (image + 256 new tokens) < 1 s", "value": f"{row['total_s']:.2f} s",
                          "met": row["total_s"] < 1.0})
    return goals


# -------------------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (what CI runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu_check")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the speed step starts no new model or context after this many seconds of the run")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU version of this check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    import transformers

    meta = {"command": " ".join(["python", "benchmarks/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    report = Report(args.out, meta)
    for step in args.steps:
        step_start = time.perf_counter()
        try:
            if step == "environment":
                result = step_environment(device, args.dry_run)
            elif step == "equality":
                result = step_equality(device, args.dry_run)
            elif step == "training":
                result = step_training(device, args.dry_run)
            else:
                result = step_speed(device, args.dry_run, deadline=started + args.budget_s)
        except Exception:  # noqa: BLE001 - record the failure, go on with the next step
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - step_start
        report.record(step, result)
    print(f"[gpu_check] results in {os.path.abspath(args.out)} ({time.perf_counter() - started:.0f} s)")
    return 0 if all(result.get("ok") for result in report.steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
