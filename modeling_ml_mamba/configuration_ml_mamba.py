"""Configuration of ML-Mamba-style vision-language models: vision tower -> connector -> Mamba language model."""

from __future__ import annotations

import math

from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

from .ml_mamba_compat import SubConfigSpec

VISION_MODEL_TYPES = ("siglip_vision_model", "dinov2", "dinov2_with_registers", "clip_vision_model")
TEXT_MODEL_TYPES = ("mamba2", "mamba")
CONNECTOR_TYPES = ("mlp", "fused-mlp", "ldp", "msc", "vss-l2")
CONNECTOR_SCANS = ("bidirectional", "cross")
# How `generate` advances a cached one-token step (`ml_mamba_decode`): the static step eager or compiled, or
# transformers' own modules.
DECODE_IMPLEMENTATIONS = ("static", "graph", "compiled", "eager")
# Written into every saved config.json so the folder loads through each Auto class with `trust_remote_code=True`.
AUTO_MAP = {
    "AutoConfig": "configuration_ml_mamba.MLMambaConfig",
    "AutoModel": "modeling_ml_mamba.MLMambaModel",
    "AutoModelForCausalLM": "modeling_ml_mamba.MLMambaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_ml_mamba.MLMambaForConditionalGeneration",
}

# The published towers (DESIGN.md): DINOv2 ViT-L/14 with 4 registers and SigLIP SO400M/14 at 384 px.
DINOV2_LARGE_REG4 = dict(
    model_type="dinov2_with_registers", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    mlp_ratio=4, patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0,
)
SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, patch_size=14, image_size=384, vision_use_head=False,
)
# state-spaces/mamba2-2.7b in transformers' layout (mamba_ssm defaults: ngroups 1, vocab 50277 padded to 50288).
MAMBA2_2_7B = dict(
    model_type="mamba2", hidden_size=2560, num_hidden_layers=64, state_size=128, head_dim=64, num_heads=80,
    expand=2, n_groups=1, conv_kernel=4, vocab_size=50288, use_bias=False, use_conv_bias=True,
    layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
    eos_token_id=0,
)


def _as_config(value, key: str, allowed: tuple[str, ...]) -> PreTrainedConfig:
    """A sub-config from a config object or a dict with ``model_type``, checked against the allowed types."""
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type == "siglip_vision_model":  # we read hidden states: the attention-pool head is never used
            value.setdefault("vision_use_head", False)
        if model_type == MLMambaFusedVisionConfig.model_type:
            value = MLMambaFusedVisionConfig(**value)
        elif model_type in CONFIG_MAPPING:
            value = CONFIG_MAPPING[model_type](**value)
        else:
            raise ValueError(f"`{key}` has model_type={model_type!r}; expected one of {allowed}.")
    if not isinstance(value, PreTrainedConfig):
        raise TypeError(f"`{key}` must be a PreTrainedConfig or a dict with a `model_type`, got {type(value).__name__}.")
    if value.model_type not in allowed:
        hint = " (pass the `.vision_config` of a full CLIP/SigLIP config)" if value.model_type in ("clip", "siglip") else ""
        raise ValueError(f"`{key}` has model_type={value.model_type!r}; expected one of {allowed}{hint}.")
    return value


class MLMambaFusedVisionConfig(PreTrainedConfig):
    """Two vision towers read side by side (Cobra / ML-Mamba "dinosiglip"): features concatenated channel-wise,
    ``first_tower`` first. Both must give the same patch grid at the model's ``image_size``."""

    model_type = "ml_mamba_fused_vision"
    sub_configs_defaults = {
        "first_tower": SubConfigSpec(config_class=AutoConfig, model_type="dinov2_with_registers",
                                     init_kwargs={k: v for k, v in DINOV2_LARGE_REG4.items() if k != "model_type"}),
        "second_tower": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model",
                                      init_kwargs={k: v for k, v in SIGLIP_SO400M_384.items() if k != "model_type"}),
    }

    first_tower: dict | PreTrainedConfig | None = None
    second_tower: dict | PreTrainedConfig | None = None
    image_size: int = 384

    def __post_init__(self, **kwargs):
        for key in ("first_tower", "second_tower"):
            if getattr(self, key) is not None:
                setattr(self, key, _as_config(getattr(self, key), f"vision_config.{key}", VISION_MODEL_TYPES))
        super().__post_init__(**kwargs)
        if self.first_tower.patch_size != self.second_tower.patch_size:
            raise ValueError(f"The fused towers need the same patch size, got {self.first_tower.patch_size} and "
                             f"{self.second_tower.patch_size}.")

    @property
    def towers(self) -> tuple[PreTrainedConfig, PreTrainedConfig]:
        return self.first_tower, self.second_tower

    @property
    def hidden_size(self) -> int:
        return self.first_tower.hidden_size + self.second_tower.hidden_size

    @property
    def patch_size(self) -> int:
        return self.first_tower.patch_size

    @property
    def num_hidden_layers(self) -> int:
        return max(self.first_tower.num_hidden_layers, self.second_tower.num_hidden_layers)


class MLMambaConfig(PreTrainedConfig):
    r"""Configuration of [`MLMambaForConditionalGeneration`], composed like `LlavaConfig`.

    Args:
        vision_config (`dict`, `PreTrainedConfig` or a list of two, *optional*):
            The vision tower: `siglip_vision_model`, `dinov2`, `dinov2_with_registers` or `clip_vision_model`; a list of
            two builds the fused tower (e.g. `[dinov2_with_registers, siglip_vision_model]`, DINOv2 first).
            Defaults to ML-Mamba's fused DINOv2-L/14-reg4 + SigLIP-SO400M/14 tower.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model, `mamba2` (default: mamba2-2.7b's shapes) or `mamba` (Mamba-1).
        connector_type (`str`, defaults to `"msc"`): one of `"mlp"`, `"fused-mlp"`, `"ldp"`, `"msc"`, `"vss-l2"`.
        connector_scan (`str`, defaults to `"bidirectional"`): `"bidirectional"` (BSM) or `"cross"` (CSM).
        connector_num_blocks (`int`, defaults to 2): scan blocks in the MSC connector.
        connector_use_swiglu (`bool`, defaults to `True`): MSC "Advanced" (SwiGLU) vs "Basic" blocks.
        connector_pool_size (`int`, defaults to 14): the LDP connector's output grid side (14 -> 196 tokens).
        connector_state_size, connector_head_dim, connector_expand, connector_n_groups, connector_conv_kernel,
        connector_chunk_size: the scan connectors' Mamba-2 mixer; `None` takes the value of a Mamba-2 `text_config`
            (ML-Mamba uses mamba2-2.7b's mixer settings) or Mamba-2's defaults.
        vision_feature_layer (`int`, defaults to -2): the vision block whose output is used (second-to-last).
        image_size (`int`, *optional*): input resolution; defaults to the vision config's `image_size`.
        image_token_id (`int`, *optional*): id of the `<image>` placeholder token (see `MLMambaProcessor`).
        initializer_range (`float`, defaults to 0.02): std of the connector's and LM head's initial weights.
        decode_implementation (`str`, defaults to `"static"`): how `generate` advances one token: `"static"` (one
            function over the LM's weights and the cache's state tensors, updated in place), `"graph"` (the same,
            captured as a CUDA graph and replayed per token on GPU; the static step on CPU), `"compiled"` (the same,
            `torch.compile`d; also captured as a CUDA graph on GPU) or `"eager"` (transformers' own modules).
        video_token_id (`int`, *optional*): id of the per-frame `<video>` token; set it to give the model videos
            (``pixel_values_videos``, see `MLMambaProcessor`).
        video_frame_pool (`int`, defaults to 1): a video frame's token grid is average-pooled by this factor per
            side (2: 729 -> 196 tokens a frame), so long videos fit; images keep every token.
        vision_batch_size (`int`, defaults to 4): images or frames per vision-tower + connector call, which bounds
            the vision side's memory however many a prompt holds.

    Example:

    ```python
    >>> from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration
    >>> config = MLMambaConfig(
    ...     vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 8,
    ...                  "head_dim": 16, "state_size": 16, "n_groups": 1, "vocab_size": 100},
    ...     connector_type="msc", image_token_id=99)
    >>> model = MLMambaForConditionalGeneration(config)
    ```
    """

    model_type = "ml_mamba"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model",
                                       init_kwargs={"vision_use_head": False}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mamba2",
                                     init_kwargs={k: v for k, v in MAMBA2_2_7B.items() if k != "model_type"}),
    }

    vision_config: dict | list | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: str = "msc"
    connector_scan: str = "bidirectional"
    connector_num_blocks: int = 2
    connector_use_swiglu: bool = True
    connector_pool_size: int = 14
    connector_state_size: int | None = None
    connector_head_dim: int | None = None
    connector_expand: int | None = None
    connector_n_groups: int | None = None
    connector_conv_kernel: int | None = None
    connector_chunk_size: int | None = None
    vision_feature_layer: int = -2
    image_size: int | None = None
    image_token_id: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool | None = None
    decode_implementation: str = "static"
    video_token_id: int | None = None
    video_frame_pool: int = 1
    vision_batch_size: int = 4

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, (list, tuple)):
            if len(self.vision_config) != 2:
                raise ValueError(f"A list `vision_config` builds the fused tower and needs exactly two configs, got "
                                 f"{len(self.vision_config)}.")
            first, second = self.vision_config
            self.vision_config = MLMambaFusedVisionConfig(first_tower=first, second_tower=second)
        elif self.vision_config is None:
            self.vision_config = MLMambaFusedVisionConfig()
        self.vision_config = _as_config(self.vision_config, "vision_config",
                                        VISION_MODEL_TYPES + (MLMambaFusedVisionConfig.model_type,))
        if self.text_config is not None:
            self.text_config = _as_config(self.text_config, "text_config", TEXT_MODEL_TYPES)
        super().__post_init__(**kwargs)

        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(f"Unknown connector_type {self.connector_type!r}: expected one of {CONNECTOR_TYPES}.")
        if self.decode_implementation not in DECODE_IMPLEMENTATIONS:
            raise ValueError(f"Unknown decode_implementation {self.decode_implementation!r}: expected one of "
                             f"{DECODE_IMPLEMENTATIONS}.")
        if self.connector_scan not in CONNECTOR_SCANS:
            raise ValueError(f"Unknown connector_scan {self.connector_scan!r}: expected one of {CONNECTOR_SCANS}.")
        for name in ("video_frame_pool", "vision_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.image_size is None:
            self.image_size = self.vision_config.image_size
        if self.image_size < self.vision_config.patch_size:
            raise ValueError(f"image_size ({self.image_size}) is smaller than the vision patch size "
                             f"({self.vision_config.patch_size}).")
        # Weight tying follows the LM (mamba2-2.7b ties its embeddings); the top-level flag is the one transformers reads.
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        auto_map = dict(getattr(self, "auto_map", None) or {})
        for auto_class, reference in AUTO_MAP.items():
            auto_map.setdefault(auto_class, reference)
        self.auto_map = auto_map

    def fit_tokenizer(self, tokenizer, image_token: str = "<image>", pad_vocab_to_multiple_of: int = 8,
                      video_token: str | None = None):
        """Make this config match ``tokenizer``: ``<image>`` (and ``video_token``, e.g. ``"<video>"``, for video
        support) is added to the tokenizer as a special token when missing (as `MLMambaProcessor` does),
        ``image_token_id`` (``video_token_id``) is set to its id, and the language model's vocabulary grows to hold
        every token id (rounded up to a multiple of ``pad_vocab_to_multiple_of``). Returns ``self``."""
        from transformers import AddedToken

        for token in (image_token, video_token):
            if token is not None and token not in tokenizer.get_vocab():
                tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if video_token is not None:
            self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        needed = -(-len(tokenizer) // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
        self.text_config.vocab_size = max(self.text_config.vocab_size, needed)
        return self

    @property
    def num_patches(self) -> int:
        """Patch tokens the vision tower emits per image."""
        return (self.image_size // self.vision_config.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Tokens the connector emits per image: what each `<image>` placeholder expands to."""
        if self.connector_type == "ldp":
            return self.connector_pool_size**2
        return self.num_patches

    @property
    def num_video_frame_tokens(self) -> int:
        """Tokens per video frame: the connector's grid, average-pooled by ``video_frame_pool`` per side."""
        if self.video_frame_pool == 1:
            return self.num_image_tokens
        side = math.isqrt(self.num_image_tokens)
        if side * side != self.num_image_tokens:
            raise ValueError(f"video_frame_pool needs a square token grid; the connector emits "
                             f"{self.num_image_tokens} tokens per image.")
        return math.ceil(side / self.video_frame_pool) ** 2

    def connector_mixer_kwargs(self) -> dict:
        """Settings of the scan connectors' Mamba-2 mixer, defaulting to a Mamba-2 LM's own settings."""
        text = self.text_config if self.text_config.model_type == "mamba2" else None

        def pick(value, name, default):
            if value is not None:
                return value
            return getattr(text, name) if text is not None else default

        return dict(
            scan=self.connector_scan,
            state_size=pick(self.connector_state_size, "state_size", 128),
            head_dim=pick(self.connector_head_dim, "head_dim", 64),
            expand=pick(self.connector_expand, "expand", 2),
            n_groups=pick(self.connector_n_groups, "n_groups", 1),
            conv_kernel=pick(self.connector_conv_kernel, "conv_kernel", 4),
            chunk_size=pick(self.connector_chunk_size, "chunk_size", 256),
        )


# `AutoConfig.for_model("ml_mamba_fused_vision")` and a saved fused vision sub-config load like any other config.
AutoConfig.register(MLMambaFusedVisionConfig.model_type, MLMambaFusedVisionConfig, exist_ok=True)
