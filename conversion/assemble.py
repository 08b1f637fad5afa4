"""Putting a converted model together: vision towers from their transformers ports, the processor, the weights
placed into an `MLMambaForConditionalGeneration` built on the meta device (no second copy of a multi-GB model),
`save_pretrained`, and a check that the saved folder loads through the Auto classes with exactly these weights.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import ConversionError, check_against

# The transformers ports of the timm towers the originals load (DESIGN.md), by prismatic `vision_backbone_id`.
VISION_BACKBONES = {
    "dinosiglip-vit-so-384px": (("facebook/dinov2-with-registers-large", "google/siglip-so400m-patch14-384"), 384),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The originals put the image features before the whole prompt (no placeholder, no BOS) and use the Zephyr format
# (Cobra/ML-Mamba's ZephyrChatPromptBuilder). This template reproduces that token layout: every image of the
# conversation becomes an `<image>` placeholder at the very start, then the Zephyr text of all turns. The answer is
# wrapped in {% generation %} so the converted model can be fine-tuned with TRL's assistant_only_loss.
IMAGE_FIRST_ZEPHYR_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- set text -%}{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endset -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ text | trim }}{{ '<|endoftext|>' }}{% endgeneration %}"
    "{%- else -%}{{ text | trim }}{{ '<|endoftext|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages -%}{{ '\n' }}{%- endif -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def load_vision_tower(source: str, token=None, revision=None):
    """A transformers vision model from a Hub id or a local folder; a full CLIP/SigLIP checkpoint gives its vision
    half. Returns (model, vision config)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(source, token=token, revision=revision)
    vision_class = {"siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel, "clip": CLIPVisionModel,
                    "clip_vision_model": CLIPVisionModel}.get(config.model_type, AutoModel)
    model = vision_class.from_pretrained(source, token=token, revision=revision, dtype=torch.float32)
    return model, model.config


def vision_tower_tensors(sources: Sequence[str], token=None, revision=None):
    """Vision configs and `model.vision_tower.*` tensors of one tower, or of two fused ones (first tower first).

    SigLIP's attention-pool head is dropped (`vision_use_head=False`): the features are read at an inner layer.
    """
    if len(sources) not in (1, 2):
        raise ValueError(f"Give one vision tower or two (fused, DINOv2 first), got {len(sources)}: {list(sources)}.")
    configs, tensors = [], {}
    prefixes = ["model.vision_tower.model."] if len(sources) == 1 else \
        ["model.vision_tower.first_tower.", "model.vision_tower.second_tower."]
    for source, prefix in zip(sources, tqdm(prefixes, desc="vision towers", unit="tower")):
        model, config = load_vision_tower(source, token=token, revision=revision)
        if getattr(config, "vision_use_head", False):
            config.vision_use_head = False
        for key, tensor in model.state_dict().items():
            if config.model_type == "siglip_vision_model" and re.match(r"(vision_model\.)?head\.", key):
                continue
            tensors[prefix + key] = tensor
        configs.append(config)
        del model
    return configs, tensors


def build_processor(tokenizer_source: str, *, num_image_tokens: int, image_size: int, fused: bool,
                    chat_template: str | None = IMAGE_FIRST_ZEPHYR_TEMPLATE, token=None, revision=None):
    """`MLMambaProcessor`: the tokenizer (GPT-NeoX-20B or Zephyr's, `<image>` added), a SigLIP image processor resizing
    naively to ``image_size`` (bicubic, as the originals), and the two tower normalisations when ``fused``."""
    from transformers import AutoTokenizer, SiglipImageProcessor

    from modeling_ml_mamba import DINO_SIGLIP_NORMALIZATIONS, MLMambaProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, token=token, revision=revision)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return MLMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens,
                            image_normalizations=DINO_SIGLIP_NORMALIZATIONS if fused else None,
                            chat_template=chat_template)


def check_image_token(processor, vocab_size: int) -> int:
    """The `<image>` id must be a row of the LM's (padded) embedding: the presets put it at 50277 for GPT-NeoX."""
    image_token_id = processor.image_token_id
    if image_token_id >= vocab_size:
        raise ConversionError(f"The tokenizer puts <image> at id {image_token_id}, outside the language model's "
                              f"{vocab_size} embedding rows; use a tokenizer with at most {vocab_size - 1} tokens.")
    return image_token_id


def materialize(config, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, model_class=None):
    """A ``model_class`` model (default `MLMambaForConditionalGeneration`) holding exactly ``tensors`` cast to
    ``dtype``: built on the meta device, every key and shape checked, then the tensors assigned and tied weights
    (`_tied_weights_keys`) re-tied. No randomly initialised copy of the model is ever made."""
    if model_class is None:
        from modeling_ml_mamba import MLMambaForConditionalGeneration as model_class

    with torch.device("meta"):
        model = model_class(config)
    tensors = dict(tensors)
    if getattr(config, "tie_word_embeddings", False):
        for tied_key, source_key in (getattr(model, "_tied_weights_keys", None) or {}).items():
            if source_key in tensors:
                tensors[tied_key] = tensors[source_key]  # re-tied below
    expected = {key: value.shape for key, value in model.state_dict().items()}
    check_against(tensors, expected, "The converted checkpoint")
    cast = {key: tensor.to(dtype) for key, tensor in tqdm(tensors.items(), desc=f"casting to {dtype}", unit="tensor")}
    model.load_state_dict(cast, strict=True, assign=True)
    model.tie_weights()
    _materialize_buffers(model)
    return model.eval()


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (e.g. position ids) are not in a state dict: rebuild them from a real-device copy of the
    module that owns them."""
    for name, module in model.named_modules():
        meta_buffers = [b for b, value in module.named_buffers(recurse=False) if value.is_meta]
        if not meta_buffers:
            continue
        for buffer_name in meta_buffers:
            value = getattr(module, buffer_name)
            if buffer_name == "position_ids":
                module.register_buffer(buffer_name, torch.arange(value.shape[-1]).expand(value.shape).clone(),
                                       persistent=False)
            else:
                raise ConversionError(f"Cannot rebuild the buffer {name}.{buffer_name} after a meta-device build.")


def save_and_verify(model, processor, output_dir, converted: Mapping[str, torch.Tensor], *, max_shard_size="5GB",
                    forward_check: bool = True) -> dict:
    """Save model + processor, reload both through the Auto classes (`trust_remote_code=True`) and check that every
    weight equals the converted one and that a forward pass on a blank image gives finite logits."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    output_dir = Path(output_dir)
    dtype = next(model.parameters()).dtype
    model.config.dtype = dtype
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    tied = model.config.tie_word_embeddings
    del model
    gc.collect()

    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True, dtype=dtype).eval()
    reloaded_processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    state = reloaded.state_dict()
    wrong = [key for key, tensor in tqdm(converted.items(), desc="verifying weights", unit="tensor")
             if not torch.equal(state[key], tensor.to(dtype))]
    if tied and not torch.equal(state["lm_head.weight"], state["model.language_model.embeddings.weight"]):
        wrong.append("lm_head.weight (not tied to the embedding after loading)")
    if wrong:
        raise ConversionError(f"After reloading {output_dir}, {len(wrong)} weight(s) differ from the converted ones: "
                              f"{wrong[:20]}")
    report = {"output_dir": str(output_dir), "parameters": sum(p.numel() for p in reloaded.parameters()),
              "tensors_checked": len(converted), "dtype": str(dtype).removeprefix("torch.")}
    if forward_check:
        size = reloaded.config.image_size
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (size, size), "gray")},
                                                 {"type": "text", "text": "What is in the image?"}]}]
        inputs = reloaded_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits = reloaded(**inputs, logits_to_keep=1).logits
        if not torch.isfinite(logits).all():
            raise ConversionError("The converted model gives non-finite logits on a test prompt.")
        report["next_token"] = reloaded_processor.decode(logits[0, -1].argmax())
    return report
