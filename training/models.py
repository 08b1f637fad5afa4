"""Getting the model and processor to train, choosing what trains (``stage``), and the LoRA configuration.

Three sources (see `ModelArguments`): a saved ML-Mamba (folder or Hub id), a preset with random weights, or a new
ML-Mamba built from pretrained parts, i.e. vision tower(s) and a Mamba LM by Hub id or local folder with a randomly
initialised connector (`build_from_parts`; offline, the same code runs on local folders).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from modeling_ml_mamba import (
    MLMambaConfig,
    MLMambaForConditionalGeneration,
    MLMambaProcessor,
    preset_config,
)

from .arguments import LORA_TARGETS, ModelArguments

logger = logging.getLogger(__name__)

# What each stage trains (attributes of `MLMambaModel`); the LM head follows the language model.
STAGE_PARTS = {
    "align": ("connector",),
    "finetune": ("connector", "language_model"),
    "cobra": ("connector", "language_model"),
    "full": ("vision_tower", "connector", "language_model"),
}
# Full CLIP/SigLIP checkpoints hold a text tower too; only their vision model is loaded.
FULL_TO_VISION = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel", "siglip2": "Siglip2VisionModel"}


def _dtype(name: str | None):
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_model_and_processor(args: ModelArguments, trust_remote_code: bool = False):
    """The (model, processor) that `ModelArguments` names, in float32 unless ``args.dtype`` says otherwise."""
    dtype = _dtype(args.dtype)
    if args.model_name_or_path is not None:
        model = MLMambaForConditionalGeneration.from_pretrained(
            args.model_name_or_path, revision=args.model_revision, dtype=dtype or torch.float32,
            attn_implementation=args.attn_implementation)
        processor = MLMambaProcessor.from_pretrained(args.model_name_or_path, revision=args.model_revision)
        return model, processor
    if args.preset is not None:
        if args.tokenizer_name_or_path is None:
            raise ValueError("--preset builds a model with random weights and needs --tokenizer_name_or_path (e.g. "
                             "EleutherAI/gpt-neox-20b for the published presets, or a local tokenizer folder).")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path, trust_remote_code=trust_remote_code)
        overrides = args.parsed_overrides()
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        config = preset_config(args.preset, tokenizer=tokenizer, **overrides)
        processor = processor_for(config, tokenizer)
        model = MLMambaForConditionalGeneration(config)
        if dtype not in (None, "auto"):
            model = model.to(dtype)
        return model, processor
    return build_from_parts(args.vision_tower, args.language_model, tokenizer=args.tokenizer_name_or_path,
                            connector_type=args.connector_type, image_size=args.image_size, dtype=dtype,
                            revision=args.model_revision, trust_remote_code=trust_remote_code,
                            **args.parsed_overrides())


def processor_for(config: MLMambaConfig, tokenizer, image_processor=None, normalizations=None,
                  check_vocab_size: bool = True) -> MLMambaProcessor:
    """An `MLMambaProcessor` for ``config`` (`MLMambaProcessor.from_config`)."""
    return MLMambaProcessor.from_config(config, tokenizer, image_processor=image_processor,
                                       image_normalizations=normalizations, check_vocab_size=check_vocab_size)


def _load_vision_model(name: str, dtype, revision: str, trust_remote_code: bool):
    """A vision-only transformers model from a Hub id or folder (the vision half of full CLIP/SigLIP checkpoints)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    kwargs = dict(revision=revision, dtype=dtype or torch.float32)
    if config.model_type in FULL_TO_VISION:
        return getattr(transformers, FULL_TO_VISION[config.model_type]).from_pretrained(name, **kwargs)
    return AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)


def _share_tensors(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` (built on the meta device) use ``source``'s parameters and buffers, without copying."""
    for name, tensor in list(source.named_parameters()) + list(source.named_buffers()):
        module_path, _, leaf = name.rpartition(".")
        module = target.get_submodule(module_path)
        if leaf in module._parameters:
            module._parameters[leaf] = tensor
        elif leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            raise ValueError(f"The pretrained part has a tensor {name!r} that the ML-Mamba tower/LM does not.")


def build_from_parts(vision_tower: str | list[str], language_model: str, tokenizer=None, connector_type: str = "msc",
                     image_size: int | None = None, dtype=None, revision: str = "main", trust_remote_code: bool = False,
                     **config_overrides):
    """A new ML-Mamba from pretrained parts: vision tower(s) and a Mamba/Mamba-2 LM, the connector random.

    Args:
        vision_tower: a Hub id or folder, or two of them for the fused tower (DINOv2 first, then SigLIP, as ML-Mamba
            and Cobra). Full CLIP/SigLIP checkpoints contribute their vision model.
        language_model: a Hub id or folder of a transformers `Mamba2ForCausalLM`/`MambaForCausalLM` (or the bare
            backbone); its LM head is kept when the embeddings are not tied.
        tokenizer: a tokenizer, or its Hub id/folder (default: the language model's). ``<image>`` is added.
        connector_type, image_size, **config_overrides: `MLMambaConfig` fields.

    Returns:
        ``(model, processor)``. The processor resizes to a square ``image_size`` and normalises with each tower's
        own mean/std (the fused tower gets one 6-channel ``pixel_values``).
    """
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    names = [vision_tower] if isinstance(vision_tower, str) else list(vision_tower)
    towers = [_load_vision_model(name, dtype, revision, trust_remote_code) for name in names]
    try:
        causal_lm = AutoModelForCausalLM.from_pretrained(language_model, revision=revision,
                                                         dtype=dtype or torch.float32)
        backbone, lm_head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    except ValueError:  # a bare backbone checkpoint (no LM head): the head is tied or starts random
        backbone, lm_head = AutoModel.from_pretrained(language_model, revision=revision,
                                                      dtype=dtype or torch.float32), None
    if tokenizer is None or isinstance(tokenizer, str):
        source = tokenizer or language_model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ValueError(f"No tokenizer could be loaded from {source!r} ({err}). Mamba checkpoints such as "
                             f"state-spaces/mamba2-2.7b ship none: pass --tokenizer_name_or_path "
                             f"EleutherAI/gpt-neox-20b (or a local tokenizer folder).") from None

    processors = [AutoImageProcessor.from_pretrained(name, revision=revision) for name in names]
    image_size = image_size or towers[-1].config.image_size
    text_config = backbone.config
    config = MLMambaConfig(vision_config=towers[0].config if len(towers) == 1 else [t.config for t in towers],
                           text_config=text_config, connector_type=connector_type, image_size=image_size,
                           tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", lm_head is None)),
                           **config_overrides)
    normalizations = [{"mean": list(p.image_mean), "std": list(p.image_std)} for p in processors]
    image_processor = processors[-1]
    image_processor.size = {"height": image_size, "width": image_size}
    for flag in ("do_center_crop", "crop_size"):
        if hasattr(image_processor, flag):
            setattr(image_processor, flag, False if flag == "do_center_crop" else None)
    processor = processor_for(config, tokenizer, image_processor, normalizations if len(towers) == 2 else None,
                              check_vocab_size=False)  # the embeddings are resized below when `<image>` was added
    config.image_token_id = processor.image_token_id

    with torch.device("meta"):
        model = MLMambaForConditionalGeneration(config)
    vision = model.model.vision_tower
    if len(towers) == 1:
        _share_tensors(vision.model, towers[0])
    else:
        _share_tensors(vision.first_tower, towers[0])
        _share_tensors(vision.second_tower, towers[1])
    _share_tensors(model.model.language_model, backbone)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    elif lm_head is not None:
        model.lm_head.weight = lm_head.weight
    _materialize_random(model, dtype)
    if len(processor.tokenizer) > model.get_input_embeddings().num_embeddings:  # e.g. `<image>` was added
        model.resize_token_embeddings(len(processor.tokenizer), pad_to_multiple_of=8)
    logger.info("Built ML-Mamba from %s + %s: %s parameters, connector %s (random).", names, language_model,
                f"{model.num_parameters():,}", connector_type)
    return model, processor


def _materialize_random(model: MLMambaForConditionalGeneration, dtype) -> None:
    """Allocate and initialise every tensor still on the meta device (the connector; an untied, missing LM head)."""
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if any(tensor.is_meta for _, tensor in tensors):
            module.to_empty(device="cpu", recurse=False)
            if dtype not in (None, "auto"):
                module.to(dtype)
            model._init_weights(module)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"Tensors left uninitialised after building from parts: {leftover[:5]}")


def apply_stage(model: MLMambaForConditionalGeneration, stage: str) -> dict[str, int]:
    """Freeze everything except the parts ``stage`` trains; returns trainable/total parameter counts per part."""
    if stage not in STAGE_PARTS:
        raise ValueError(f"Unknown stage {stage!r}: expected one of {sorted(STAGE_PARTS)}.")
    trained = STAGE_PARTS[stage]
    model.requires_grad_(False)
    for part in trained:
        getattr(model.model, part).requires_grad_(True)
    model.lm_head.requires_grad_("language_model" in trained)  # tied heads share the embedding's flag anyway
    model.model.freeze_unused_vision_parameters()  # never reach the features: no gradient (DDP would refuse them)
    counts = {}
    for part in ("vision_tower", "connector", "language_model"):
        params = list(getattr(model.model, part).parameters())
        counts[part] = sum(p.numel() for p in params if p.requires_grad)
    return counts


def lora_config(args: ModelArguments, model: MLMambaForConditionalGeneration | None = None):
    """The peft `LoraConfig` of ``args`` (TRL's LoRA fields): adapters on the Mamba mixers' ``in_proj`` by default,
    the connector trained fully (``modules_to_save``); with ``lora_scope="language_model+connector"`` the connector's
    own mixers get adapters too and its other layers train fully (``model`` is needed to list them)."""
    from peft import LoraConfig

    modules_to_save = args.lora_modules_to_save
    if modules_to_save is None:
        if args.lora_scope == "language_model+connector":
            if model is None:
                raise ValueError("lora_scope='language_model+connector' needs the model to list the connector layers.")
            modules_to_save = connector_layers_besides_mixers(model)
        else:
            modules_to_save = ["connector"]
    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
        target_modules=args.lora_target_modules or LORA_TARGETS[args.lora_scope],
        modules_to_save=modules_to_save, task_type=args.lora_task_type, use_rslora=args.use_rslora,
        use_dora=args.use_dora)


def connector_layers_besides_mixers(model: MLMambaForConditionalGeneration) -> list[str]:
    """Full names of the connector's layers other than its Mamba mixers (e.g. ``model.connector.input_proj``,
    ``model.connector.blocks.0.mlp``)."""
    names = []

    def visit(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            full = f"{prefix}.{name}"
            if name == "mixer":
                continue
            if any(sub == "mixer" for sub, _ in child.named_children()) or isinstance(child, nn.ModuleList):
                visit(child, full)
            elif any(True for _ in child.parameters()):
                names.append(full)

    visit(model.model.connector, "model.connector")
    return names
