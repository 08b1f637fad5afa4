"""The released ML-Mamba and Cobra checkpoints as `MLMambaForConditionalGeneration` folders.

Key names come from the authors' code (read, not copied):

* ML-Mamba (`WenjunHuang94/ML-Mamba`, `latest-checkpoint.pt`), saved by its FSDP strategy as
  ``{"model": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}}``:
  - ``llm_backbone``: mamba_ssm `MambaLMHeadModel` keys with the ``llm_backbone.llm.`` prefix removed
    (``backbone.embedding.weight``, ``backbone.layers.N.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight``);
  - ``mlp``: ``nn.Sequential(Linear, GELU)`` -> ``0.weight``, ``0.bias``;
  - ``bidirectional_mamba``: the fork's `Bidirectional_Mamba` (`WenjunHuang94/mamba`,
    `mamba_ssm/models/mixer_seq_simple.py`): ``layers.N.mixer`` is `Mamba2(bimamba_type="v2")` with
    ``in_proj``, ``conv1d``/``conv1d_b``, ``dt_bias``/``dt_bias_b``, ``A_log``/``A_log_b``, ``D``/``D_b``,
    ``norm.weight`` (gated RMSNorm, shared), ``out_proj``; ``layers.N.norm`` a LayerNorm and ``layers.N.mlp`` a
    SwiGLU ``w1, w2, w3`` (`mamba_ssm/modules/block.py`); ``norm_f`` a LayerNorm;
  - ``projector``: `FusedMLPProjector(llm_dim, llm_dim)` -> ``projector.0/2/4``.
* Cobra (`h-zhao1997/cobra`, ``cobra+3b/config.json`` + ``cobra+3b/checkpoints/latest-checkpoint.pt``), saved by
  the prismatic strategy as ``{"model": {"projector", "llm_backbone"}}``: ``projector.{0,2,4}`` (fused GELU
  MLP; the `projector` Sequential inside `FusedMLPProjector`), ``projector.{0,2}`` + ``projector.4.peg.0`` (fused
  LDP), and the LM with its ``llm.`` attribute prefix (``llm.backbone.embedding.weight``, ...,
  ``llm.lm_head.weight``; Mamba-1 mixers).

Vision weights are not in either checkpoint: they come from the transformers ports of the timm towers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .assemble import (
    VISION_BACKBONES,
    build_processor,
    check_image_token,
    materialize,
    save_and_verify,
    torch_dtype,
    vision_tower_tensors,
)
from .checkpoints import ConversionError, KeyMapper, layer_indices, load_pickle, resolve_file, sub_dict
from .mamba_ssm_lm import mamba_ssm_lm_mapper, read_mamba_ssm_config, text_config_from_mamba_ssm

ML_MAMBA_REPO, ML_MAMBA_FILE = "huangwenjun1994/ML-Mamba", "latest-checkpoint.pt"
COBRA_REPO, COBRA_MODEL = "han1997/cobra", "cobra+3b"
ZEPHYR_TOKENIZER = "xiuyul/mamba-2.8b-zephyr"  # GPT-NeoX-20B's vocabulary with a pad token (DESIGN.md)
GPT_NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
DEFAULT_VISION = VISION_BACKBONES["dinosiglip-vit-so-384px"]
LM = "model.language_model."
CONNECTOR = "model.connector."

def ml_mamba_connector_rules() -> dict[str, list[tuple[str, str | None]]]:
    """Rename rules of the three connector parts of ML-Mamba's checkpoint into the MSC connector."""
    bidirectional = [(r"layers\.(\d+)\.mixer\.(in_proj|out_proj)\.weight", CONNECTOR + r"blocks.\1.mixer.\2.weight"),
                     (r"layers\.(\d+)\.mixer\.norm\.weight", CONNECTOR + r"blocks.\1.mixer.norm.weight")]
    # The per-direction SSM parameters: "<name>" scans forward (our direction 0), "<name>_b" the reversed sequence
    # (direction 1).
    for suffix, direction in (("", 0), ("_b", 1)):
        bidirectional += [
            (rf"layers\.(\d+)\.mixer\.conv1d{suffix}\.(weight|bias)",
             CONNECTOR + rf"blocks.\1.mixer.directions.{direction}.conv1d.\2"),
            (rf"layers\.(\d+)\.mixer\.(dt_bias|A_log|D){suffix}",
             CONNECTOR + rf"blocks.\1.mixer.directions.{direction}.\2"),
        ]
    bidirectional += [(r"layers\.(\d+)\.norm\.(weight|bias)", CONNECTOR + r"blocks.\1.norm.\2"),
                      (r"layers\.(\d+)\.mlp\.(w[123])\.(weight|bias)", CONNECTOR + r"blocks.\1.mlp.\2.\3"),
                      (r"norm_f\.(weight|bias)", CONNECTOR + r"norm_f.\1")]
    return {
        "mlp": [(r"0\.(weight|bias)", CONNECTOR + r"input_proj.\1")],
        "bidirectional_mamba": bidirectional,
        "projector": [(r"projector\.0\.(weight|bias)", CONNECTOR + r"projector.linear_1.\1"),
                      (r"projector\.2\.(weight|bias)", CONNECTOR + r"projector.linear_2.\1"),
                      (r"projector\.4\.(weight|bias)", CONNECTOR + r"projector.linear_3.\1")],
    }


def cobra_projector_rules(connector_type: str) -> list[tuple[str, str]]:
    if connector_type == "fused-mlp":
        return [(rf"projector\.{index}\.(weight|bias)", CONNECTOR + rf"linear_{n}.\1")
                for n, index in ((1, 0), (2, 2), (3, 4))]
    if connector_type == "ldp":
        return [(r"projector\.0\.(weight|bias)", CONNECTOR + r"linear_1.\1"),
                (r"projector\.2\.(weight|bias)", CONNECTOR + r"linear_2.\1"),
                (r"projector\.4\.peg\.0\.(weight|bias)", CONNECTOR + r"position_conv.\1")]
    if connector_type == "mlp":
        return [(r"projector\.0\.(weight|bias)", CONNECTOR + r"linear_1.\1"),
                (r"projector\.2\.(weight|bias)", CONNECTOR + r"linear_2.\1")]
    raise ConversionError(f"No Cobra projector mapping for connector {connector_type!r}.")


def _model_dict(checkpoint_path, expected: set[str], optional: set[str] = frozenset()) -> dict:
    checkpoint = load_pickle(checkpoint_path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ConversionError(f"{checkpoint_path} should hold {{'model': {{...}}}}; found "
                              f"{sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__}.")
    parts = checkpoint["model"]
    missing, extra = expected - set(parts), set(parts) - expected - set(optional)
    if missing or extra:
        raise ConversionError(f"{checkpoint_path}['model'] should have the parts {sorted(expected)}; missing "
                              f"{sorted(missing)}, unexpected {sorted(extra)}.")
    return parts


def _msc_settings(bidirectional: dict, n_groups: int) -> dict:
    """The MSC connector's configuration read from the shapes of ML-Mamba's `bidirectional_mamba` weights."""
    blocks = layer_indices(bidirectional, "layers.")
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(f"bidirectional_mamba should have layers 0..N-1, found {blocks}.")
    mixer = "layers.0.mixer."
    if f"{mixer}conv1d_b.weight" not in bidirectional:
        raise ConversionError("bidirectional_mamba has no `conv1d_b`: not the bidirectional (bimamba v2) mixer.")
    num_heads = bidirectional[f"{mixer}A_log"].shape[0]
    hidden, intermediate = bidirectional[f"{mixer}out_proj.weight"].shape
    conv_dim, _, conv_kernel = bidirectional[f"{mixer}conv1d.weight"].shape
    state_size = (conv_dim - intermediate) // (2 * n_groups)
    return dict(connector_num_blocks=len(blocks), connector_use_swiglu="layers.0.mlp.w1.weight" in bidirectional,
                connector_state_size=state_size, connector_head_dim=intermediate // num_heads,
                connector_expand=intermediate // hidden, connector_n_groups=n_groups,
                connector_conv_kernel=conv_kernel)


def _vision_config(configs):
    return configs[0] if len(configs) == 1 else list(configs)


# What the cards of converted models say about where the weights come from (DESIGN.md, the papers).
ML_MAMBA_TRAINING = {
    "recipe": "Converted with `ml-mamba-convert` from the authors' release; no further training. Original recipe "
              "(ML-Mamba paper): stage 1 aligns the Mamba-2 Scan Connector and projector on image captions with the "
              "LM frozen; stage 2 fine-tunes connector, projector and LM on instructions; AdamW, lr 2e-5, cosine "
              "decay, warmup 3%, weight decay 0.1, bf16, vision towers frozen.",
    "data": ["LLaVA 558K LAION-CC-SBU captions (alignment)", "LLaVA-v1.5 665K instruction mix (fine-tuning)"],
}
COBRA_TRAINING = {
    "recipe": "Converted with `ml-mamba-convert` from the authors' release; no further training. Original recipe "
              "(Cobra paper): no alignment stage; 2 epochs fine-tuning projector and LM, lr 2e-5, global batch 128, "
              "weight decay 0.1, warmup 3%, vision towers frozen.",
    "data": ["LLaVA-v1.5 665K", "LVIS-Instruct-4V", "LRV-Instruct (about 1.2M samples)"],
}


def _finish(text_config, converted: dict, config_kwargs: dict, *, vision_towers, tokenizer: str, output_dir,
            dtype: str, max_shard_size: str, forward_check: bool, token, card: dict) -> dict:
    """Vision towers, processor and config around the converted LM/connector tensors; save, verify, write the card."""
    from ml_mamba.model_cards import save_model_card
    from modeling_ml_mamba import MLMambaConfig

    vision_configs, vision_tensors = vision_tower_tensors(vision_towers, token=token)
    converted = {**converted, **vision_tensors}
    # The config's number of image tokens sizes the processor; the processor's <image> id completes the config.
    probe = MLMambaConfig(vision_config=_vision_config(vision_configs), text_config=text_config, **config_kwargs)
    processor = build_processor(tokenizer, num_image_tokens=probe.num_image_tokens, image_size=probe.image_size,
                                fused=len(vision_configs) == 2, token=token)
    config = MLMambaConfig(vision_config=_vision_config(vision_configs), text_config=text_config,
                           image_token_id=check_image_token(processor, text_config.vocab_size), **config_kwargs)
    model = materialize(config, converted, torch_dtype(dtype))
    report = save_and_verify(model, processor, output_dir, converted, max_shard_size=max_shard_size,
                             forward_check=forward_check)
    hub_id = card.pop("hub_id", None) or Path(output_dir).name
    save_model_card(output_dir, model_id=hub_id,
                    base_models=[base for base in [*vision_towers, *card.pop("base_models", [])]
                                 if base.count("/") == 1 and not Path(base).exists()] or None,
                    tags=["converted"], **card)
    return report


def map_ml_mamba(parts: dict, n_groups: int = 1, ssm_config: dict | None = None):
    """ML-Mamba's checkpoint parts -> (LM config, renamed tensors, MLMambaConfig fields). Pure renaming and shape
    reading: no file access, so it also runs on meta tensors."""
    llm = sub_dict(parts, "llm_backbone", "checkpoint['model']")
    text_config = text_config_from_mamba_ssm(llm, ssm_config, prefix="backbone.") if ssm_config else \
        _text_config_with_groups(llm, n_groups)
    if text_config.model_type != "mamba2":
        raise ConversionError("ML-Mamba's llm_backbone should be a Mamba-2 LM (mixers with dt_bias); this one is "
                              "Mamba-1.")
    converted = mamba_ssm_lm_mapper(text_config, "backbone.", "lm_head.weight", LM, "lm_head.weight",
                                    "llm_backbone").apply(llm)
    for part, rules in ml_mamba_connector_rules().items():
        converted.update(KeyMapper(part, rules).apply(sub_dict(parts, part, "checkpoint['model']")))
    msc = _msc_settings(sub_dict(parts, "bidirectional_mamba", "checkpoint['model']"), n_groups)
    config_kwargs = dict(connector_type="msc", connector_scan="bidirectional",
                         tie_word_embeddings=text_config.tie_word_embeddings, **msc)
    return text_config, converted, config_kwargs


def convert_ml_mamba(checkpoint: str = ML_MAMBA_REPO, output_dir: str | Path = "ml-mamba-2.7b", *,
                     checkpoint_file: str = ML_MAMBA_FILE, vision_towers: Sequence[str] = DEFAULT_VISION[0],
                     image_size: int = DEFAULT_VISION[1], tokenizer: str = ZEPHYR_TOKENIZER,
                     lm_config: str | None = None, n_groups: int = 1, dtype: str = "float32",
                     max_shard_size: str = "5GB", forward_check: bool = True, hub_id: str | None = None,
                     token=None) -> dict:
    """ML-Mamba's released checkpoint -> `MLMambaForConditionalGeneration` (MSC connector, Mamba-2 LM) in ``output_dir``.

    Args:
        checkpoint: the `.pt` file, a folder holding ``checkpoint_file``, or a Hub repo id.
        vision_towers: Hub ids or folders of the DINOv2-with-registers and SigLIP transformers ports (in that order).
        image_size: input resolution (384 for the release).
        tokenizer: Hub id or folder of the tokenizer (`<image>` is added at the first free id).
        lm_config: optional mamba_ssm `config.json` of the LM (`state-spaces/mamba2-2.7b`'s) to check against; the
            checkpoint alone is enough otherwise.
        n_groups: the Mamba-2 mixers' B/C groups (mamba_ssm's default 1; shapes alone cannot tell it).
        hub_id: the repo id the model card's usage snippet loads (default: the output folder's name).
    Returns the verification report (see `save_and_verify`); the folder also gets a model card.
    """
    path = resolve_file(checkpoint, checkpoint_file, token=token)
    parts = _model_dict(path, {"llm_backbone", "mlp", "bidirectional_mamba", "projector"})
    ssm_config = read_mamba_ssm_config(resolve_file(lm_config, "config.json", token=token)) if lm_config else None
    text_config, converted, config_kwargs = map_ml_mamba(parts, n_groups, ssm_config)
    card = dict(hub_id=hub_id, training=ML_MAMBA_TRAINING, base_models=[ML_MAMBA_REPO, "state-spaces/mamba2-2.7b"],
                datasets=["liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K"])
    return _finish(text_config, converted, {**config_kwargs, "image_size": image_size}, vision_towers=vision_towers,
                   tokenizer=tokenizer, output_dir=output_dir, dtype=dtype, max_shard_size=max_shard_size,
                   forward_check=forward_check, token=token, card=card)


def _text_config_with_groups(llm: dict, n_groups: int):
    """Shapes-only config of the LM, with ``n_groups`` (which shapes cannot tell) set explicitly."""
    from .mamba_ssm_lm import MAMBA_SSM_DEFAULTS

    inferred = text_config_from_mamba_ssm(llm, None, prefix="backbone.")
    if n_groups == 1 or inferred.model_type != "mamba2":
        return inferred
    ssm_config = {**MAMBA_SSM_DEFAULTS, "d_model": inferred.hidden_size, "n_layer": inferred.num_hidden_layers,
                  "vocab_size": inferred.vocab_size, "pad_vocab_size_multiple": 1,
                  "tie_embeddings": inferred.tie_word_embeddings, "ssm_cfg": {"ngroups": n_groups}}
    return text_config_from_mamba_ssm(llm, ssm_config, prefix="backbone.")


def _cobra_connector(arch_specifier: str) -> str:
    for suffix, connector in (("fused-gelu-mlp", "fused-mlp"), ("fused-ldpnet", "ldp"), ("gelu-mlp", "mlp")):
        if arch_specifier.endswith(suffix):
            return connector
    raise ConversionError(f"Cobra arch_specifier {arch_specifier!r} has no equivalent connector here (supported: "
                          f"*fused-gelu-mlp, *fused-ldpnet, *gelu-mlp).")


def map_cobra(parts: dict, connector_type: str):
    """Cobra's checkpoint parts -> (LM config, renamed tensors, MLMambaConfig fields); no file access."""
    llm = sub_dict(parts, "llm_backbone", "checkpoint['model']")
    text_config = text_config_from_mamba_ssm(llm, None, prefix="llm.backbone.", lm_head_key="llm.lm_head.weight")
    converted = mamba_ssm_lm_mapper(text_config, "llm.backbone.", "llm.lm_head.weight", LM, "lm_head.weight",
                                    "llm_backbone").apply(llm)
    converted.update(KeyMapper("projector", cobra_projector_rules(connector_type)).apply(
        sub_dict(parts, "projector", "checkpoint['model']")))
    config_kwargs = dict(connector_type=connector_type, tie_word_embeddings=text_config.tie_word_embeddings)
    if connector_type == "ldp":
        config_kwargs["connector_pool_size"] = 14  # TokenDownLayer((14, 14)) in Cobra's FusedLDPProjector
    return text_config, converted, config_kwargs


def convert_cobra(checkpoint: str = COBRA_REPO, output_dir: str | Path = "cobra-3.5b", *, model_id: str = COBRA_MODEL,
                  vision_towers: Sequence[str] | None = None, image_size: int | None = None,
                  tokenizer: str | None = None, dtype: str = "float32", max_shard_size: str = "5GB",
                  forward_check: bool = True, hub_id: str | None = None, token=None) -> dict:
    """A released Cobra run (``config.json`` + ``checkpoints/latest-checkpoint.pt``) -> `MLMambaForConditionalGeneration`.

    Args:
        checkpoint: a run folder, or a Hub repo id holding ``{model_id}/config.json`` and
            ``{model_id}/checkpoints/latest-checkpoint.pt`` (default `han1997/cobra`, `cobra+3b`).
        vision_towers, image_size: default to the run's `vision_backbone_id` (`dinosiglip-vit-so-384px`: the
            DINOv2-with-registers and SigLIP-SO400M-384 ports at 384 px).
        tokenizer: defaults to the LM's: Zephyr's for `mamba-2.8b-zephyr`, GPT-NeoX-20B's otherwise.
        hub_id: the repo id the model card's usage snippet loads (default: the output folder's name).
    """
    local = Path(checkpoint).is_dir()
    config_path = resolve_file(checkpoint, "config.json", subfolder=None if local else model_id, token=token)
    with open(config_path, encoding="utf-8") as handle:
        run_config = json.load(handle)
    run = run_config.get("model", run_config)
    missing = [key for key in ("arch_specifier", "vision_backbone_id", "llm_backbone_id") if key not in run]
    if missing:
        raise ConversionError(f"{config_path} is not a Cobra run config: no {missing} under 'model'.")
    connector_type = _cobra_connector(run["arch_specifier"])
    if vision_towers is None or image_size is None:
        if run["vision_backbone_id"] not in VISION_BACKBONES:
            raise ConversionError(f"No default towers for vision_backbone_id {run['vision_backbone_id']!r}: pass "
                                  f"vision_towers and image_size.")
        default_towers, default_size = VISION_BACKBONES[run["vision_backbone_id"]]
        vision_towers = vision_towers or default_towers
        image_size = image_size or default_size
    zephyr = run["llm_backbone_id"].endswith("zephyr")
    tokenizer = tokenizer or (ZEPHYR_TOKENIZER if zephyr else GPT_NEOX_TOKENIZER)

    path = resolve_file(checkpoint, "latest-checkpoint.pt",
                        subfolder="checkpoints" if local else f"{model_id}/checkpoints", token=token)
    text_config, converted, config_kwargs = map_cobra(_model_dict(path, {"projector", "llm_backbone"}), connector_type)
    card = dict(hub_id=hub_id, training=COBRA_TRAINING,
                base_models=[COBRA_REPO, ZEPHYR_TOKENIZER if zephyr else "state-spaces/mamba-2.8b-slimpj"],
                datasets=["liuhaotian/LLaVA-Instruct-150K", "X2FD/LVIS-Instruct4V"])
    return _finish(text_config, converted, {**config_kwargs, "image_size": image_size}, vision_towers=vision_towers,
                   tokenizer=tokenizer, output_dir=output_dir, dtype=dtype, max_shard_size=max_shard_size,
                   forward_check=forward_check, token=token, card=card)
