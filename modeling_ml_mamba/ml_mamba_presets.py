"""Named configurations of the published models (shapes from DESIGN.md) and a tiny one for trying things out.

```python
>>> from modeling_ml_mamba import preset_config, MLMambaForConditionalGeneration
>>> config = preset_config("ml-mamba-2.7b")           # random weights, the published shapes
>>> tiny = MLMambaForConditionalGeneration(preset_config("tiny", connector_type="ldp"))
```
"""

from __future__ import annotations

from .configuration_ml_mamba import DINOV2_LARGE_REG4, MAMBA2_2_7B, SIGLIP_SO400M_384, MLMambaConfig

# Mamba-1 2.8B (state-spaces/mamba-2.8b-slimpj, xiuyul/mamba-2.8b-zephyr): vocab 50277 padded to a multiple of 8.
MAMBA_2_8B = dict(
    model_type="mamba", hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2, conv_kernel=4,
    vocab_size=50280, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
)
# `<image>` sits in the padded rows of the GPT-NeoX vocabulary (real tokens end at 50276), so no resize is needed.
GPT_NEOX_IMAGE_TOKEN_ID = 50277

PRESETS: dict[str, dict] = {
    # ML-Mamba (arXiv 2407.19832): DINOv2+SigLIP @384 -> MSC (BSM, 2 Advanced blocks) -> Mamba-2 2.7B.
    "ml-mamba-2.7b": dict(
        vision_config=[DINOV2_LARGE_REG4, SIGLIP_SO400M_384], text_config=MAMBA2_2_7B, image_size=384,
        connector_type="msc", connector_scan="bidirectional", connector_num_blocks=2, connector_use_swiglu=True,
        image_token_id=GPT_NEOX_IMAGE_TOKEN_ID,
    ),
    # Cobra-3.5B (arXiv 2403.14520, "cobra+3b"): DINOv2+SigLIP @384 -> fused GELU MLP -> Mamba 2.8B Zephyr.
    "cobra-3.5b": dict(
        vision_config=[DINOV2_LARGE_REG4, SIGLIP_SO400M_384], text_config=MAMBA_2_8B, image_size=384,
        connector_type="fused-mlp", image_token_id=GPT_NEOX_IMAGE_TOKEN_ID,
    ),
    # Cobra's LDPv2 ablation: 729 -> 196 visual tokens.
    "cobra-3.5b-ldp": dict(
        vision_config=[DINOV2_LARGE_REG4, SIGLIP_SO400M_384], text_config=MAMBA_2_8B, image_size=384,
        connector_type="ldp", connector_pool_size=14, image_token_id=GPT_NEOX_IMAGE_TOKEN_ID,
    ),
    # VL-Mamba (arXiv 2403.13600): SigLIP-SO400M @384 -> VSS-L2 (cross scan) -> Mamba 2.8B SlimPJ.
    "vl-mamba": dict(
        vision_config=SIGLIP_SO400M_384, text_config=MAMBA_2_8B, image_size=384, connector_type="vss-l2",
        connector_scan="cross", connector_state_size=128, connector_head_dim=64, connector_expand=2,
        connector_n_groups=1, image_token_id=GPT_NEOX_IMAGE_TOKEN_ID,
    ),
    # A few-hundred-thousand-parameter model with the ML-Mamba layout, for tests and smoke runs.
    "tiny": dict(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="mamba2", hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                         state_size=16, n_groups=1, expand=2, chunk_size=16, vocab_size=128, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0),
        connector_type="msc", connector_num_blocks=1, image_token_id=127,
    ),
}


def preset_config(name: str, tokenizer=None, **overrides) -> MLMambaConfig:
    """The `MLMambaConfig` of a named preset (see `PRESETS`), with any field overridden by keyword; with a
    ``tokenizer``, fitted to it (`MLMambaConfig.fit_tokenizer`: ``<image>`` id and vocabulary size), ready for
    `MLMambaProcessor.from_config(config, tokenizer)`."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}: expected one of {sorted(PRESETS)}.")
    fields = dict(PRESETS[name])
    for key in ("vision_config", "text_config"):  # deep-copy the nested dicts so callers cannot mutate the presets
        value = fields[key]
        fields[key] = [dict(v) for v in value] if isinstance(value, list) else dict(value)
    fields.update(overrides)
    config = MLMambaConfig(**fields)
    return config.fit_tokenizer(tokenizer) if tokenizer is not None else config
