"""Write the Hub model card (`README.md`) of a saved ml-mamba model.

Metadata (library, pipeline tag, license, base models, datasets, tags, `model-index`) is a `ModelCardData`; the prose
is `templates/model_card.md` rendered by `ModelCard.from_template`. Architecture facts and parameter counts are read
from the model itself (or from the saved config, instantiated on the meta device, when no model is given).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

# (key, title, arXiv id, BibTeX) of the papers whose architectures this package implements.
ARCHITECTURE_PAPERS = [
    ("ml-mamba", "ML-Mamba: Efficient Multi-Modal Large Language Model Utilizing Mamba-2", "2407.19832",
     """@article{huang2024mlmamba,
  title={ML-Mamba: Efficient Multi-Modal Large Language Model Utilizing Mamba-2},
  author={Huang, Wenjun and Pan, Jiakai and Tang, Jiahao and Ding, Yanyu and Xing, Yifei and Wang, Yuhe and Wang, Zhengzhuo and Hu, Jianguo},
  journal={arXiv preprint arXiv:2407.19832},
  year={2024}
}"""),
    ("cobra", "Cobra: Extending Mamba to Multi-Modal Large Language Model for Efficient Inference", "2403.14520",
     """@article{zhao2024cobra,
  title={Cobra: Extending Mamba to Multi-Modal Large Language Model for Efficient Inference},
  author={Zhao, Han and Zhang, Min and Zhao, Wei and Ding, Pengxiang and Huang, Siteng and Wang, Donglin},
  journal={arXiv preprint arXiv:2403.14520},
  year={2024}
}"""),
    ("vl-mamba", "VL-Mamba: Exploring State Space Models for Multimodal Learning", "2403.13600",
     """@article{qiao2024vlmamba,
  title={VL-Mamba: Exploring State Space Models for Multimodal Learning},
  author={Qiao, Yanyuan and Yu, Zheng and Guo, Longteng and Chen, Sihan and Zhao, Zijia and Sun, Mingzhen and Wu, Qi and Liu, Jing},
  journal={arXiv preprint arXiv:2403.13600},
  year={2024}
}"""),
]

VISION_NAMES = {
    "siglip_vision_model": "SigLIP",
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "clip_vision_model": "CLIP",
}
TEXT_NAMES = {"mamba2": "Mamba-2", "mamba": "Mamba (Mamba-1)"}
SCAN_NAMES = {"bidirectional": "bidirectional scan (BSM)", "cross": "cross scan (CSM)"}
EVAL_RESULT_KEYS = set(EvalResult.__dataclass_fields__)
# Keys of `training` the template renders in their own place; any other key is listed as-is.
TRAINING_KEYS = ("recipe", "data", "hyperparameters", "steps", "train_time_s", "metrics")


def _connector_summary(config) -> str:
    kind = config.connector_type
    if kind == "mlp":
        return "MLP (LLaVA): Linear → GELU → Linear"
    if kind == "fused-mlp":
        return "fused GELU MLP (Cobra): Linear(d_v → 4 d_v) → GELU → Linear → GELU → Linear"
    if kind == "ldp":
        return (f"LDPv2 (MobileVLM v2, Cobra's ablation): MLP, average-pooled to {config.connector_pool_size}×"
                f"{config.connector_pool_size} tokens, depthwise 3×3 position conv")
    scan = SCAN_NAMES[config.connector_scan]
    if kind == "msc":
        blocks = "Advanced (SwiGLU)" if config.connector_use_swiglu else "Basic"
        return (f"Mamba-2 Scan Connector (ML-Mamba): {config.connector_num_blocks} {blocks} block(s) with a "
                f"{scan}, then a fused GELU MLP")
    if kind == "vss-l2":
        return f"VSS-L2 (VL-Mamba): Linear → GELU → 2D {scan} + skip → LayerNorm → Linear"
    return kind


def _family(config) -> str:
    """The seed architecture a configuration follows."""
    if config.connector_type == "msc" and config.text_config.model_type == "mamba2":
        return "ML-Mamba"
    if config.connector_type in ("fused-mlp", "ldp") and config.text_config.model_type == "mamba":
        return "Cobra"
    if config.connector_type == "vss-l2":
        return "VL-Mamba"
    return "ML-Mamba-style"


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (vision tower, connector, language model, LM head), tied weights counted once."""
    counts = {"vision_tower": 0, "connector": 0, "language_model": 0, "lm_head": 0, "other": 0}
    for name, parameter in model.named_parameters():  # shared (tied) parameters are yielded once
        part = next((key for key in ("vision_tower", "connector", "language_model", "lm_head")
                     if f".{key}." in f".{name}"), "other")
        counts[part] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def _load_config(folder: str | os.PathLike):
    from modeling_ml_mamba import MLMambaConfig

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {folder}: pass `model=` or save the model there first.")
    return MLMambaConfig.from_pretrained(folder)


def _meta_model(config) -> torch.nn.Module:
    """The model built on the meta device: its parameter shapes, with no memory and no weights."""
    from modeling_ml_mamba import MLMambaForConditionalGeneration

    with torch.device("meta"):
        return MLMambaForConditionalGeneration(config)


def describe_model(model=None, config=None) -> dict:
    """Architecture facts and measured parameter counts of a model (or of a config, built on the meta device)."""
    if model is None and config is None:
        raise ValueError("describe_model needs a `model` or a `config`.")
    config = config if config is not None else model.config
    model = model if model is not None else _meta_model(config)
    vision = config.vision_config
    towers = list(vision.towers) if vision.model_type == "ml_mamba_fused_vision" else [vision]
    text = config.text_config
    return {
        "family": _family(config),
        "vision_towers": [
            {"name": VISION_NAMES.get(tower.model_type, tower.model_type), "model_type": tower.model_type,
             "hidden_size": tower.hidden_size, "num_hidden_layers": tower.num_hidden_layers,
             "patch_size": tower.patch_size} for tower in towers],
        "vision_hidden_size": vision.hidden_size,
        "vision_feature_layer": config.vision_feature_layer,
        "image_size": config.image_size,
        "num_patches": config.num_patches,
        "num_image_tokens": config.num_image_tokens,
        "connector_type": config.connector_type,
        "connector": _connector_summary(config),
        "text_name": TEXT_NAMES.get(text.model_type, text.model_type),
        "text_model_type": text.model_type,
        "text_hidden_size": text.hidden_size,
        "text_num_layers": text.num_hidden_layers,
        "text_state_size": getattr(text, "state_size", None),
        "vocab_size": text.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "parameters": count_parameters(model),
    }


def _eval_results(eval_results) -> list[EvalResult] | None:
    if not eval_results:
        return None
    results = []
    for index, result in enumerate(eval_results):
        if isinstance(result, EvalResult):
            results.append(result)
            continue
        if not isinstance(result, dict):
            raise TypeError(f"eval_results[{index}] must be a dict or an EvalResult, got {type(result).__name__}.")
        unknown = sorted(set(result) - EVAL_RESULT_KEYS)
        missing = sorted({"task_type", "dataset_type", "dataset_name", "metric_type", "metric_value"} - set(result))
        if unknown or missing:
            raise ValueError(f"eval_results[{index}] does not match huggingface_hub.EvalResult: unknown keys "
                             f"{unknown}, missing keys {missing}.")
        results.append(EvalResult(**result))
    return results


def _as_list(value) -> list | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _duration(seconds) -> str:
    seconds = float(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{int(hours)} h {int(minutes)} min"
    if minutes:
        return f"{int(minutes)} min {secs:.0f} s"
    return f"{secs:.1f} s"


def usage_snippet(model_id: str, image_size: int = 384) -> str:
    """The Python usage example of the card (also what the tests run against a saved folder)."""
    return f'''from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

model_id = "{model_id}"
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

image = Image.new("RGB", ({image_size}, {image_size}), "white")  # or Image.open("your_image.jpg")
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "What is shown in this image?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

# or through the pipeline
pipe = pipeline("image-text-to-text", model=model_id, trust_remote_code=True)
print(pipe(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"])'''


def build_model_card(model=None, *, config=None, model_id: str, base_models=None, datasets=None, training=None,
                     eval_results=None, license: str = "apache-2.0", tags: Iterable[str] | None = None) -> ModelCard:
    """A `ModelCard` for a model (or a config); see `save_model_card` for the arguments."""
    facts = describe_model(model, config)
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"`training` must be a dict (keys such as {TRAINING_KEYS}), got {type(training).__name__}.")
    training = dict(training or {})
    default_tags = ["ml-mamba", facts["family"].lower(), facts["text_model_type"], "mamba", "state-space-model",
                    "vision-language", "multimodal", "image-text-to-text", "custom_code"]
    all_tags = list(dict.fromkeys(default_tags + list(tags or [])))
    results = _eval_results(eval_results)
    card_data = ModelCardData(
        model_name=model_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        language=["en"],
        base_model=_as_list(base_models),
        datasets=_as_list(datasets),
        tags=all_tags,
        eval_results=results,
    )
    extra_training = {key: value for key, value in training.items() if key not in TRAINING_KEYS}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_id=model_id,
        model_name=card_data.model_name,
        facts=facts,
        base_models=_as_list(base_models) or [],
        datasets=_as_list(datasets) or [],
        training=training,
        train_time=_duration(training["train_time_s"]) if training.get("train_time_s") is not None else None,
        extra_training=extra_training,
        results=results or [],
        usage=usage_snippet(model_id, facts["image_size"]),
        papers=ARCHITECTURE_PAPERS,
    )


def save_model_card(folder, model=None, *, model_id=None, base_models=None, datasets=None, training=None,
                    eval_results=None, license="apache-2.0", tags=None) -> ModelCard:
    """Write ``folder/README.md``, the Hub model card of the model saved in ``folder``, and return it.

    Args:
        folder: the model folder (`save_pretrained` output); the card is written there as `README.md`.
        model: the model, for the parameter counts; when `None` the config in `folder` is built on the meta device.
        model_id: the Hub repo id shown in the card and its usage snippet (defaults to the folder path).
        base_models, datasets: Hub ids (a string or a list) for the metadata.
        training: free-form dict: "recipe", "data", "hyperparameters" (dict), "steps", "train_time_s",
            "metrics" (dict), and any other key (listed as is).
        eval_results: `huggingface_hub.EvalResult` objects or dicts of their keyword arguments (`task_type`,
            `dataset_type`, `dataset_name`, `dataset_split`, `metric_type`, `metric_value`, ...); rendered as
            `model-index` and as a table. The evaluation harness's `results.json["model_index"]` fits as is.
        license: an SPDX-style Hub license id.
        tags: extra Hub tags.
    """
    folder = Path(folder)
    config = None if model is not None else _load_config(folder)
    card = build_model_card(model, config=config, model_id=model_id or folder.as_posix(), base_models=base_models,
                            datasets=datasets, training=training, eval_results=eval_results, license=license,
                            tags=tags)
    folder.mkdir(parents=True, exist_ok=True)
    card.save(folder / "README.md")
    return card
