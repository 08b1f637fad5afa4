"""The three argument dataclasses of `ml-mamba-train`, parsed from YAML (``--config recipe.yaml``) and the command line
by TRL's `TrlParser` (an `HfArgumentParser`): `ModelArguments`, `DataArguments` and `MLMambaSFTConfig`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, SFTConfig

STAGES = ("align", "finetune", "cobra", "full")
LORA_SCOPES = ("language_model", "language_model+connector")

# LoRA goes on the Mamba mixers' input projections only. Not `out_proj`: mamba-ssm's fused GPU training kernel reads
# `out_proj.weight` directly, so an adapter there would silently not train (HF-NOTES pitfall 12). Never `lm_head`:
# TRL's fused loss multiplies by the LM head's weight itself.
LORA_TARGETS = {
    "language_model": r".*language_model\.layers\.\d+\.mixer\.in_proj",
    "language_model+connector": r".*(language_model\.layers\.\d+|connector(\.blocks\.\d+)?)\.mixer\.in_proj",
}


@dataclass
class ModelArguments(ModelConfig):
    """Which model to train, which parts of it (``stage``) and how (full weights or LoRA).

    Exactly one model source:

    - ``model_name_or_path``: a saved ML-Mamba folder or Hub id (continue training it);
    - ``preset``: a named configuration with random weights (`modeling_ml_mamba.PRESETS`), plus a tokenizer;
    - ``vision_tower`` (one, or two to fuse them) + ``language_model``: build a new ML-Mamba from pretrained parts
      (Hub ids or local folders), the connector randomly initialised.

    LoRA fields are TRL's (`--use_peft --lora_r 16 ...`); the default targets are the Mamba mixers' ``in_proj``.
    """

    preset: str | None = field(default=None, metadata={"help": "Preset name (ml-mamba-2.7b, cobra-3.5b, tiny, ...)."})
    vision_tower: list[str] | None = field(
        default=None, metadata={"help": "Vision tower Hub id(s) or folder(s); two ids build the fused tower "
                                        "(DINOv2 first, then SigLIP), e.g. facebook/dinov2-with-registers-large "
                                        "google/siglip-so400m-patch14-384."})
    language_model: str | None = field(
        default=None, metadata={"help": "Mamba / Mamba-2 LM Hub id or folder in transformers format."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer for a new model (default: the language model's own)."})
    connector_type: str = field(default="msc", metadata={"help": "Connector of a new model: mlp, fused-mlp, ldp, msc, "
                                                                 "vss-l2."})
    image_size: int | None = field(default=None, metadata={"help": "Input resolution of a new model."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated MLMambaConfig overrides for a new model, e.g. "
                                        "'connector_num_blocks=2,connector_scan=cross'."})
    stage: str = field(default="finetune", metadata={
        "help": "What trains: align = connector only; finetune = connector + LM (vision frozen); cobra = Cobra's "
                "single-stage recipe (same parts as finetune, from an unaligned model); full = everything.",
        "choices": list(STAGES)})
    lora_scope: str = field(default="language_model", metadata={
        "help": "With --use_peft: LoRA on the LM mixers' in_proj (language_model), or also on the connector's Mamba "
                "mixers (language_model+connector). The rest of the connector trains fully (modules_to_save).",
        "choices": list(LORA_SCOPES)})
    dtype: str | None = field(default="float32", metadata={
        "help": "dtype the weights are loaded in; keep float32 master weights and use --bf16 for mixed precision.",
        "choices": ["auto", "bfloat16", "float16", "float32"]})

    def __post_init__(self):
        super().__post_init__()
        sources = {"model_name_or_path": self.model_name_or_path, "preset": self.preset,
                   "vision_tower + language_model": self.vision_tower or self.language_model}
        given = [name for name, value in sources.items() if value]
        if len(given) != 1:
            raise ValueError(f"Give exactly one model source: --model_name_or_path, --preset, or --vision_tower with "
                             f"--language_model; got {given or 'none'}.")
        if (self.vision_tower is None) != (self.language_model is None):
            raise ValueError("Building from parts needs both --vision_tower (one or two) and --language_model.")
        if self.vision_tower is not None and len(self.vision_tower) not in (1, 2):
            raise ValueError(f"--vision_tower takes one or two towers, got {len(self.vision_tower)}.")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}.")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"--lora_scope must be one of {LORA_SCOPES}, got {self.lora_scope!r}.")
        if self.use_peft and self.stage == "align":
            raise ValueError("--use_peft adapts the language model, which stage 'align' keeps frozen; use stage "
                             "'finetune' or 'cobra' with LoRA, or train the connector without --use_peft.")
        if self.load_in_4bit or self.load_in_8bit:
            raise ValueError("4/8-bit loading is not supported for ML-Mamba training.")
        if self.use_peft and self.lora_target_modules is not None:
            targets = [self.lora_target_modules] if isinstance(self.lora_target_modules, str) \
                else self.lora_target_modules
            for target in targets:
                if re.search(r"out_proj|lm_head", target):
                    raise ValueError(f"--lora_target_modules {target!r} reaches `out_proj` or `lm_head`. mamba-ssm's "
                                     f"fused training kernel reads `out_proj.weight` directly (a LoRA there would not "
                                     f"train on GPU) and TRL's fused loss uses the LM head's weight itself; target "
                                     f"`in_proj` (the default) instead.")

    def parsed_overrides(self) -> dict:
        """``config_overrides`` as a dict of Python values (ints, floats, booleans, strings)."""
        overrides = {}
        for item in filter(None, (self.config_overrides or "").split(",")):
            if "=" not in item:
                raise ValueError(f"--config_overrides items look like key=value, got {item!r}.")
            key, value = (part.strip() for part in item.split("=", 1))
            overrides[key] = _literal(value)
        return overrides


def _literal(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@dataclass
class DataArguments:
    """Where the training data comes from: a LLaVA-format JSON + image folder, or a `datasets` dataset."""

    data_path: str | None = field(default=None, metadata={
        "help": "LLaVA-format JSON/JSONL file: [{'image': 'rel/path.jpg', 'conversations': [{'from': 'human', "
                "'value': '<image>\\n...'}, {'from': 'gpt', 'value': '...'}]}]."})
    image_folder: str | None = field(default=None, metadata={
        "help": "Folder the LLaVA image paths are relative to (default: the JSON file's folder)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A `datasets` dataset (Hub id, local folder or save_to_disk folder) with 'messages' + 'images' "
                "(TRL's format) or LLaVA's 'conversations' + 'image'."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional LLaVA-format JSON for evaluation."})
    dataset_test_split: str | None = field(default=None, metadata={
        "help": "Optional split of --dataset_name to evaluate on."})
    bad_samples: str = field(default="error", metadata={
        "help": "error: stop with a list of the bad samples; skip: drop and count them.",
        "choices": ["error", "skip"]})
    verify_images: bool = field(default=False, metadata={"help": "Decode-check every image file before training."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples (smoke runs)."})


def accelerator_available() -> bool:
    """Whether a training accelerator (CUDA, XPU, NPU) is present."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def bf16_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return accelerator_available()


@dataclass
class MLMambaSFTConfig(SFTConfig):
    """TRL's `SFTConfig` with defaults for ML-Mamba.

    - ``bf16`` and ``activation_checkpointing`` (formerly ``gradient_checkpointing``) default to *auto*: on (bf16 where
      supported) with a GPU, off on a CPU-only machine, where TRL's defaults would fail ("Your setup doesn't support
      bf16/gpu") or only slow training down.
    - ``assistant_only_loss=True``: loss on the assistant's answers only (the chat template marks them with
      ``{% generation %}``); image placeholders and prompts carry none.
    - ``max_length=None``: no truncation, which would cut through image tokens (long samples are the data's job).
    - ``use_cpu`` is set on a machine without an accelerator, so that multi-process runs use gloo.
    - ``resume``: continue from the last ``checkpoint-*`` in ``output_dir`` (or ``--resume_from_checkpoint PATH``).
    """

    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: auto, on where "
                                                              "supported, off on CPU)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Deprecated alias of --activation_checkpointing (default: auto, on with a GPU, off on CPU)."})
    assistant_only_loss: bool = field(default=True, metadata={"help": "Loss on assistant answers only."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate samples to this many tokens (None: no "
                                                                    "truncation; it must exceed the image tokens)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    merge_lora: bool = field(default=False, metadata={
        "help": "With --use_peft, also write the LoRA merged into a plain checkpoint to <output_dir>/merged."})
    pack_samples: bool = field(default=False, metadata={
        "help": "Padding-free batches: the samples of a batch in one row, each with its own fresh state (Mamba-2 "
                "LMs; TRL's padding_free does not take vision data)."})

    def __post_init__(self):
        if not accelerator_available():
            self.use_cpu = True  # also what makes `accelerate launch` give gloo processes instead of one process
        on_accelerator = not self.use_cpu
        if self.bf16 is None:
            self.bf16 = bool(on_accelerator and bf16_available() and not self.fp16)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = on_accelerator
        if not on_accelerator:
            self.dataloader_pin_memory = False  # nothing to pin for
        super().__post_init__()
