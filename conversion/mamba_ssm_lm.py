"""mamba_ssm-format language models (`config.json` + `pytorch_model.bin`, e.g. `state-spaces/mamba2-2.7b`,
`state-spaces/mamba-2.8b-slimpj`, `xiuyul/mamba-2.8b-zephyr`) in transformers' `Mamba2`/`Mamba` layout.

The configuration is read from the file where it says something and from the tensor shapes otherwise, and the two
are checked against each other (HF-NOTES §8). Key names equal transformers' except ``backbone.embedding`` ->
``backbone.embeddings``, renamed explicitly: `from_pretrained` does not run the model's own rename hook, so a
converter that left it would load a random embedding and LM head without an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from transformers import MambaConfig, Mamba2Config

from .checkpoints import ConversionError, KeyMapper, layer_indices

# mamba_ssm's `MambaConfig` defaults (mamba_ssm/models/config_mamba.py): what a config.json leaves out means these.
MAMBA_SSM_DEFAULTS = dict(d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[],
                          attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                          pad_vocab_size_multiple=8, tie_embeddings=True, norm_epsilon=1e-5)
# `ssm_cfg` keys of each mixer that only set the initialisation or kernels, i.e. nothing a converted model needs.
_MAMBA2_INIT_ONLY = {"layer", "A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init", "use_mem_eff_path"}
_MAMBA1_INIT_ONLY = {"layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
_MAMBA2_KNOWN = _MAMBA2_INIT_ONLY | {"d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias",
                                    "conv_bias", "dt_limit", "d_ssm", "D_has_hdim", "rmsnorm", "norm_before_gate"}
_MAMBA1_KNOWN = _MAMBA1_INIT_ONLY | {"d_state", "d_conv", "expand", "dt_rank", "bias", "conv_bias"}


def read_mamba_ssm_config(path) -> dict:
    """A mamba_ssm `config.json` with mamba_ssm's defaults filled in."""
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    if "d_model" not in raw:
        raise ConversionError(f"{path} is not a mamba_ssm config (no `d_model`); found keys {sorted(raw)}.")
    return {**MAMBA_SSM_DEFAULTS, **raw, "ssm_cfg": dict(raw.get("ssm_cfg") or {})}


def is_mamba2(state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> bool:
    """Mamba-2 mixers have a per-head ``dt_bias``; Mamba-1 mixers a ``dt_proj``."""
    first = layer_indices(state, f"{prefix}layers.")
    if not first:
        raise ConversionError(f"No `{prefix}layers.N.` keys: not a mamba_ssm language model.")
    return f"{prefix}layers.{first[0]}.mixer.dt_bias" in state


def _tensor(state, key):
    if key not in state:
        raise ConversionError(f"The checkpoint has no {key!r}; is it a mamba_ssm language model?")
    return state[key]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors (one shared tensor when tied); meta tensors, which hold no values, only by identity."""
    if a is b:
        return True
    if a.is_meta or b.is_meta or a.shape != b.shape:
        return False
    return torch.equal(a, b)


def _agree(name: str, from_config, from_shapes):
    if from_config is not None and from_config != from_shapes:
        raise ConversionError(f"config.json says {name}={from_config} but the weights have {name}={from_shapes}.")
    return from_shapes


def text_config_from_mamba_ssm(state: Mapping[str, torch.Tensor], ssm_config: dict | None = None,
                               prefix: str = "backbone.", lm_head_key: str | None = "lm_head.weight"):
    """The transformers `Mamba2Config` / `MambaConfig` of a mamba_ssm LM state dict (keys under ``prefix``).

    ``ssm_config`` is the model's mamba_ssm config.json (`read_mamba_ssm_config`); without it (ML-Mamba's and Cobra's
    checkpoints carry none) everything is read from the shapes, with mamba_ssm's defaults (``ngroups=1``) for what
    shapes cannot tell.
    """
    given = ssm_config is not None
    cfg = ssm_config if given else {**MAMBA_SSM_DEFAULTS, "ssm_cfg": {}}
    ssm = cfg["ssm_cfg"]
    if cfg.get("d_intermediate", 0):
        raise ConversionError(f"d_intermediate={cfg['d_intermediate']} (MLP blocks between mixers) cannot be expressed "
                              "in transformers' Mamba/Mamba2 models.")
    if cfg.get("attn_layer_idx"):
        raise ConversionError(f"attn_layer_idx={cfg['attn_layer_idx']} (hybrid attention layers) is not supported.")
    if not cfg.get("rms_norm", True):
        raise ConversionError("rms_norm=False (LayerNorm blocks) is not supported: transformers' Mamba models use "
                              "RMSNorm.")

    vocab_size, hidden_size = _tensor(state, f"{prefix}embedding.weight").shape
    layers = layer_indices(state, f"{prefix}layers.")
    if layers != list(range(len(layers))):
        raise ConversionError(f"Layer indices are not contiguous from 0: {layers}.")
    _agree("d_model", cfg["d_model"] if given else None, hidden_size)
    _agree("n_layer", cfg["n_layer"] if given else None, len(layers))
    if given:
        multiple = cfg["pad_vocab_size_multiple"]
        padded = cfg["vocab_size"] + (-cfg["vocab_size"]) % multiple
        _agree("vocab_size (padded to a multiple of pad_vocab_size_multiple)", padded, vocab_size)
    has_head = lm_head_key is not None and lm_head_key in state
    same_as_embedding = has_head and _same(state[lm_head_key], state[f"{prefix}embedding.weight"])
    if given:
        tied = bool(cfg.get("tie_embeddings", True))
        if has_head and tied and not same_as_embedding:
            raise ConversionError(f"tie_embeddings is set but {lm_head_key} differs from the input embedding.")
    else:  # no config: a head equal to the embedding (or no head at all) is a tied one
        tied = not has_head or same_as_embedding
    if lm_head_key is not None and not tied and not has_head:
        raise ConversionError(f"tie_embeddings=False but the checkpoint has no {lm_head_key!r}.")

    mixer = f"{prefix}layers.0.mixer."
    common = dict(hidden_size=hidden_size, num_hidden_layers=len(layers), vocab_size=vocab_size,
                  layer_norm_epsilon=cfg.get("norm_epsilon", 1e-5), residual_in_fp32=bool(cfg["residual_in_fp32"]),
                  tie_word_embeddings=tied, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                  use_bias=f"{mixer}in_proj.bias" in state, use_conv_bias=f"{mixer}conv1d.bias" in state)
    if is_mamba2(state, prefix):
        unknown = sorted(set(ssm) - _MAMBA2_KNOWN)
        if unknown:
            raise ConversionError(f"Unknown Mamba-2 ssm_cfg keys {unknown}.")
        for key, supported in (("d_ssm", None), ("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
            if ssm.get(key, supported) != supported:
                raise ConversionError(f"ssm_cfg {key}={ssm[key]} cannot be expressed in transformers' Mamba2 "
                                      f"(needs {supported}).")
        num_heads = _tensor(state, f"{mixer}A_log").shape[0]
        intermediate = _tensor(state, f"{mixer}out_proj.weight").shape[1]
        conv_dim, _, conv_kernel = _tensor(state, f"{mixer}conv1d.weight").shape
        n_groups = ssm.get("ngroups", 1)
        if (conv_dim - intermediate) % (2 * n_groups):
            raise ConversionError(f"conv1d width {conv_dim} - d_inner {intermediate} is not a multiple of 2 * ngroups "
                                  f"({n_groups}).")
        state_size = _agree("d_state", ssm.get("d_state"), (conv_dim - intermediate) // (2 * n_groups))
        head_dim = _agree("headdim", ssm.get("headdim"), intermediate // num_heads)
        expand = _agree("expand", ssm.get("expand"), intermediate // hidden_size)
        _agree("d_conv", ssm.get("d_conv"), conv_kernel)
        in_rows = _tensor(state, f"{mixer}in_proj.weight").shape[0]
        if in_rows != 2 * intermediate + 2 * n_groups * state_size + num_heads or expand * hidden_size != intermediate:
            raise ConversionError(f"Inconsistent Mamba-2 shapes: in_proj has {in_rows} rows, d_inner={intermediate}, "
                                  f"ngroups={n_groups}, d_state={state_size}, heads={num_heads}, d_model={hidden_size}.")
        limit = tuple(ssm.get("dt_limit", (0.0, float("inf"))))
        return Mamba2Config(num_heads=num_heads, head_dim=head_dim, state_size=state_size, expand=expand,
                            n_groups=n_groups, conv_kernel=conv_kernel, chunk_size=ssm.get("chunk_size", 256),
                            time_step_limit=limit, time_step_min=ssm.get("dt_min", 0.001),
                            time_step_max=ssm.get("dt_max", 0.1), time_step_floor=ssm.get("dt_init_floor", 1e-4),
                            **common)

    unknown = sorted(set(ssm) - _MAMBA1_KNOWN)
    if unknown:
        raise ConversionError(f"Unknown Mamba-1 ssm_cfg keys {unknown}.")
    intermediate = _tensor(state, f"{mixer}in_proj.weight").shape[0] // 2
    state_size = _agree("d_state", ssm.get("d_state"), _tensor(state, f"{mixer}A_log").shape[1])
    conv_kernel = _agree("d_conv", ssm.get("d_conv"), _tensor(state, f"{mixer}conv1d.weight").shape[2])
    time_step_rank = _tensor(state, f"{mixer}dt_proj.weight").shape[1]
    if ssm.get("dt_rank", "auto") != "auto":
        _agree("dt_rank", ssm["dt_rank"], time_step_rank)
    elif given and time_step_rank != math.ceil(hidden_size / 16):
        raise ConversionError(f"dt_rank='auto' means {math.ceil(hidden_size / 16)} but dt_proj has rank "
                              f"{time_step_rank}.")
    if intermediate % hidden_size:
        raise ConversionError(f"d_inner {intermediate} is not a multiple of d_model {hidden_size}.")
    expand = _agree("expand", ssm.get("expand"), intermediate // hidden_size)
    return MambaConfig(state_size=state_size, expand=expand, conv_kernel=conv_kernel, time_step_rank=time_step_rank,
                       time_step_scale=ssm.get("dt_scale", 1.0), time_step_min=ssm.get("dt_min", 0.001),
                       time_step_max=ssm.get("dt_max", 0.1), time_step_init_scheme=ssm.get("dt_init", "random"),
                       time_step_floor=ssm.get("dt_init_floor", 1e-4), **common)


def lm_key_rules(source_prefix: str, target_backbone: str, tied: bool, source_head: str = "lm_head.weight",
                 target_head: str = "lm_head.weight") -> list[tuple[str, str | None]]:
    """Rename rules from a mamba_ssm LM (``{source_prefix}embedding|layers|norm_f``) to transformers' layout under
    ``target_backbone``; a tied LM head is dropped (transformers re-ties it from the embedding)."""
    src = source_prefix.replace(".", r"\.")
    return [
        (rf"{src}embedding\.weight", f"{target_backbone}embeddings.weight"),  # the rename from_pretrained would miss
        (rf"{src}layers\.(\d+)\.(norm\.weight|mixer\.[A-Za-z_0-9]+(?:\.weight|\.bias)?)", rf"{target_backbone}layers.\1.\2"),
        (rf"{src}norm_f\.weight", f"{target_backbone}norm_f.weight"),
        (source_head.replace(".", r"\."), None if tied else target_head),
    ]


def mamba_ssm_lm_mapper(config, source_prefix: str = "backbone.", source_head: str = "lm_head.weight",
                        target_backbone: str = "backbone.", target_head: str = "lm_head.weight",
                        name: str = "language model") -> KeyMapper:
    return KeyMapper(name, lm_key_rules(source_prefix, target_backbone, config.tie_word_embeddings, source_head,
                                        target_head))


def convert_mamba_ssm_lm(source: str, output_dir, *, tokenizer: str | None = None, dtype: str = "float32",
                         max_shard_size: str = "5GB", token=None) -> dict:
    """A mamba_ssm LM (folder or Hub id with `config.json` + `pytorch_model.bin`) -> a transformers
    `Mamba2ForCausalLM` / `MambaForCausalLM` folder, reloaded through `AutoModelForCausalLM` and checked weight by
    weight. ``tokenizer`` (Hub id or folder, e.g. `EleutherAI/gpt-neox-20b`) is saved alongside with left padding.
    """
    import gc

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, Mamba2ForCausalLM, MambaForCausalLM

    from .assemble import materialize, torch_dtype
    from .checkpoints import load_pickle, resolve_file

    ssm_config = read_mamba_ssm_config(resolve_file(source, "config.json", token=token))
    state = load_pickle(resolve_file(source, "pytorch_model.bin", token=token))
    if isinstance(state, dict) and "model" in state and "backbone.embedding.weight" not in state:
        raise ConversionError("pytorch_model.bin holds {'model': ...}: this is a VLM checkpoint, not a mamba_ssm LM.")
    text_config = text_config_from_mamba_ssm(state, ssm_config)
    converted = mamba_ssm_lm_mapper(text_config).apply(state)
    model_class = Mamba2ForCausalLM if text_config.model_type == "mamba2" else MambaForCausalLM
    target_dtype = torch_dtype(dtype)
    model = materialize(text_config, converted, target_dtype, model_class=model_class)
    model.config.dtype = target_dtype
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer, token=token)
        tok.padding_side = "left"  # batched generation with a recurrent model needs left padding
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(output_dir)
    del model
    gc.collect()

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=target_dtype).eval()
    loaded = reloaded.state_dict()
    wrong = [key for key, tensor in tqdm(converted.items(), desc="verifying weights", unit="tensor")
             if not torch.equal(loaded[key], tensor.to(target_dtype))]
    if text_config.tie_word_embeddings and not torch.equal(loaded["lm_head.weight"],
                                                           loaded["backbone.embeddings.weight"]):
        wrong.append("lm_head.weight (not tied after loading)")
    if wrong:
        raise ConversionError(f"After reloading {output_dir}, these weights differ from the checkpoint: {wrong[:20]}")
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([[0, 1, 2, 3]])).logits
    if not torch.isfinite(logits).all():
        raise ConversionError("The converted LM gives non-finite logits.")
    return {"output_dir": str(output_dir), "model_type": text_config.model_type,
            "class": type(reloaded).__name__, "parameters": sum(p.numel() for p in reloaded.parameters()),
            "tensors_checked": len(converted), "dtype": dtype}
