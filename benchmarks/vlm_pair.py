"""The two VLMs the benchmarks compare, built with random weights at matched sizes.

* ``ml-mamba``: this package's `MLMambaForConditionalGeneration` (vision tower -> MSC scan connector -> transformers'
  `Mamba2Model`), with the fast CPU path (the default);
* ``ml-mamba-hf``: the same model on transformers' reference PyTorch path (`enable_fast_mamba2(model, False)`);
* ``llava``: transformers' own `LlavaForConditionalGeneration` with a `LlamaForCausalLM`-style text model (SDPA).

Both share the same vision tower config and emit the same number of image tokens (729 for a 384x384 image with
patch 14); the language models have the same width and vocabulary and matched parameter counts (one Llama layer
holds about two Mamba-2 layers' parameters, so the Llama has half the layers).
"""

from __future__ import annotations

import copy
import json
import os
import platform

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor

from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer
from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME
from modeling_ml_mamba.ml_mamba_fast_mamba2 import enable_fast_mamba2

ARMS = ("ml-mamba", "ml-mamba-hf", "llava")

# Matched pairs. "s": ~129M-parameter LMs (d=768), the size PERF-NOTES measured; "tiny": for tests and smoke runs.
SIZES = {
    "s": dict(
        hidden=768, vocab=50288, mamba_layers=24, state=128, head_dim=64, mamba_chunk=256,
        llama_layers=12, llama_heads=12, llama_intermediate=2240,
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=384, patch_size=14),
    ),
    "tiny": dict(
        hidden=64, vocab=512, mamba_layers=4, state=16, head_dim=16, mamba_chunk=16,
        llama_layers=2, llama_heads=4, llama_intermediate=192,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56, patch_size=14),
    ),
}
PROMPT = "<image>\nProvide a detailed description of the image."  # ML-Mamba's speed-test prompt (paper, 4.3)
_CORPUS = [PROMPT.replace("<image>", ""), "A photo of a cat sitting on a red sofa next to a window.",
           "The image shows a handwritten digit on a dark background."]


def _vision_config(size: dict) -> dict:
    return dict(model_type="siglip_vision_model", vision_use_head=False, **size["vision"])


def tokenizer(vocab_size: int = 300):
    """A small byte-level BPE tokenizer (with `<image>`), trained offline: token ids only need to be valid."""
    return train_bpe_tokenizer(_CORPUS * 20, vocab_size=vocab_size)


def build_model(arm: str, size: str = "s", image_token_id: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random-weight VLM of one arm, in eval mode."""
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}: expected one of {ARMS}.")
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}: expected one of {sorted(SIZES)}.")
    spec = SIZES[size]
    torch.manual_seed(seed)
    if arm == "llava":
        text = dict(model_type="llama", hidden_size=spec["hidden"], num_hidden_layers=spec["llama_layers"],
                    num_attention_heads=spec["llama_heads"], num_key_value_heads=spec["llama_heads"],
                    intermediate_size=spec["llama_intermediate"], vocab_size=spec["vocab"],
                    max_position_embeddings=32768, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
                    eos_token_id=0)
        config = LlavaConfig(vision_config=_vision_config(spec), text_config=text, image_token_id=image_token_id,
                             image_seq_length=(spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2,
                             vision_feature_select_strategy="full", vision_feature_layer=-2,
                             tie_word_embeddings=True)
        config._attn_implementation = "sdpa"
        model = LlavaForConditionalGeneration(config)
    else:
        text = dict(model_type="mamba2", hidden_size=spec["hidden"], num_hidden_layers=spec["mamba_layers"],
                    state_size=spec["state"], head_dim=spec["head_dim"],
                    num_heads=2 * spec["hidden"] // spec["head_dim"], expand=2, n_groups=1,
                    chunk_size=spec["mamba_chunk"], vocab_size=spec["vocab"], tie_word_embeddings=True,
                    pad_token_id=0, bos_token_id=0, eos_token_id=0)
        config = MLMambaConfig(vision_config=_vision_config(spec), text_config=text, connector_type="msc",
                               connector_num_blocks=2, image_token_id=image_token_id,
                               image_size=spec["vision"]["image_size"])
        model = MLMambaForConditionalGeneration(config)
        if arm == "ml-mamba-hf":
            enable_fast_mamba2(model, enabled=False)
    model.generation_config.pad_token_id = 0
    return model.eval()


def processor(arm: str, model, tok) -> object:
    """The arm's processor around one shared tokenizer and image processor (both expand `<image>` to 729 tokens)."""
    size = model.config.vision_config.image_size
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    tok = copy.deepcopy(tok)
    if arm == "llava":
        return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=model.config.vision_config.patch_size,
                              vision_feature_select_strategy="full", image_token="<image>",
                              num_additional_image_tokens=0)
    return MLMambaProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=model.config.num_image_tokens)


def language_model(model) -> torch.nn.Module:
    return model.model.language_model


def parameter_counts(model) -> dict:
    """Parameters of the whole VLM and of its language model (tied embeddings counted once)."""
    def count(module):
        return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

    lm = language_model(model)
    return {"total": count(model), "language_model": count(lm), "vision_tower": count(model.model.vision_tower),
            "connector": count(model) - count(lm) - count(model.model.vision_tower)}


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds between decoding steps (KV or conv + SSM states)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        for name in ("conv_states", "recurrent_states"):
            for tensor in (getattr(layer, name, None) or {}).values():
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total


def decode_step(arm: str, model, tokens: torch.Tensor, cache):
    """One cached forward of `tokens` (batch, 1): the call `generate` makes per new token. Returns the logits."""
    return model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{_cache_name(arm): cache}).logits


def prefill(arm: str, model, inputs_embeds: torch.Tensor):
    """The cached forward over a whole context given as embeddings; returns (logits of the last position, cache)."""
    out = model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
    return out.logits, getattr(out, _cache_name(arm))


def _cache_name(arm: str) -> str:
    """The cache's keyword and output field: `cache` from transformers 5.24 on, else per model family."""
    if CACHE_NAME == "cache":
        return "cache"
    return "past_key_values" if arm == "llava" else CACHE_NAME


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    """The CPU's model name and widest vector extension, e.g. ``AMD EPYC 9R14 (AVX-512)``, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    isa = "AVX-512" if " avx512f " in info else "AVX2" if " avx2 " in info else "no AVX2"
    return f"{name} ({isa})"


def run_meta(threads: int, **fields) -> dict:
    """What every benchmark records beside its numbers: the machine, versions, thread count and the load before."""
    import transformers

    return {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__, "load_before": load_average(),
            **fields}


def write_report(output: str, results: dict, table: str) -> None:
    """``results`` to ``output.json`` and ``table`` to ``output.md`` (folders created), the table printed."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".json", "w") as handle:
        json.dump(results, handle, indent=1)
    with open(output + ".md", "w") as handle:
        handle.write(table)
    print(table)


def finish_log_plot(figure, axes, titles, xlabel: str, suptitle: str, path: str, legend_size: int = 8) -> None:
    """The benchmarks' plots: log-log axes (x in powers of 2) with titles, grids and legends, a title over all;
    written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for axis, title in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=legend_size)
    figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
