"""Builders shared by the tests: tiny random models, a locally trained tokenizer, small real images, and a way to
run code in a fresh Python process that cannot import this package (as a Hub user would)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer
from modeling_ml_mamba import (
    DINO_SIGLIP_NORMALIZATIONS,
    MLMambaConfig,
    MLMambaForConditionalGeneration,
    MLMambaProcessor,
)

IMAGE_SIZE = 32
PATCH = 8
CORPUS = [
    "Which digit is shown? It is a seven.",
    "Is the digit even or odd? Odd.",
    "Is it greater than four? Yes. No.",
    "Describe the picture in a few words: a handwritten number on a dark background.",
    "zero one two three four five six seven eight nine",
]

SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
DINOV2_REG = dict(model_type="dinov2_with_registers", hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                  mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=PATCH, num_register_tokens=2)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer():
    return train_bpe_tokenizer(CORPUS * 20, vocab_size=300)


def tokenizer():
    """A fresh copy of a small byte-level BPE tokenizer (trained once per session)."""
    import copy

    return copy.deepcopy(_trained_tokenizer())


def text_config(kind: str = "mamba2", vocab_size: int = 320) -> dict:
    if kind == "mamba2":
        return dict(model_type="mamba2", hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
                    n_groups=1, expand=2, chunk_size=16, vocab_size=vocab_size, tie_word_embeddings=True,
                    pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if kind == "mamba":
        return dict(model_type="mamba", hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
                    vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


def tiny_config(connector_type: str = "msc", text: str = "mamba2", vision: str = "siglip", **overrides) -> MLMambaConfig:
    """A tiny MLMambaConfig; the image token id is the one `tiny_processor` adds to `tokenizer()`."""
    vision_config = {"siglip": SIGLIP, "clip": CLIP, "dinov2": DINOV2_REG, "fused": [DINOV2_REG, SIGLIP]}[vision]
    fields = dict(vision_config=vision_config, text_config=text_config(text), connector_type=connector_type,
                  connector_num_blocks=1, connector_chunk_size=8, connector_pool_size=2, image_size=IMAGE_SIZE,
                  image_token_id=_trained_tokenizer().convert_tokens_to_ids("<image>"))
    fields.update(overrides)
    return MLMambaConfig(**fields)


def tiny_processor(config: MLMambaConfig, **kwargs) -> MLMambaProcessor:
    from transformers import SiglipImageProcessor

    fused = config.vision_config.model_type == "ml_mamba_fused_vision"
    processor = MLMambaProcessor(
        image_processor=SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer(), num_image_tokens=config.num_image_tokens,
        image_normalizations=DINO_SIGLIP_NORMALIZATIONS if fused else None, **kwargs)
    assert processor.image_token_id == config.image_token_id
    return processor


def tiny_model(connector_type: str = "msc", text: str = "mamba2", vision: str = "siglip", seed: int = 0, **overrides):
    """(model, processor), the model in eval mode with random weights from ``seed``."""
    import torch

    config = tiny_config(connector_type, text, vision, **overrides)
    torch.manual_seed(seed)
    return MLMambaForConditionalGeneration(config).eval(), tiny_processor(config)


def digit_images(count: int = 4, start: int = 0) -> list[Image.Image]:
    """Real handwritten digits (scikit-learn's 8x8 digits, shipped with the package) as RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for index in range(start, start + count):
        pixels = (digits.images[index] / 16.0 * 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE)).convert("RGB"))
    return images


def chat(image=None, question="Which digit is shown?"):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


BLOCK_PACKAGE = """
import importlib.abc, sys
class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_ml_mamba", "ml_mamba"):
            raise ModuleNotFoundError(f"{name} is blocked: this process plays a Hub user without the package")
sys.meta_path.insert(0, _BlockPackage())
"""


def run_without_package(code: str, cwd: str, timeout: int = 600) -> str:
    """Run ``code`` in a fresh offline Python process in which `modeling_ml_mamba`/`ml_mamba` cannot be imported.

    Returns stdout; raises with stderr on failure.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    script = BLOCK_PACKAGE + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result.stdout
