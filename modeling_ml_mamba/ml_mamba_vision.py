"""Vision towers: any transformers vision model, or two of them fused channel-wise (Cobra/ML-Mamba's DINOv2+SigLIP)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel


# Where transformers' vision models keep their encoder layers, and the parts that run after the last layer.
_ENCODER_LAYERS = ("vision_model.encoder.layers", "encoder.layers", "encoder.layer")
_AFTER_ENCODER = ("vision_model.post_layernorm", "vision_model.head", "post_layernorm", "head", "layernorm", "pooler")
# Parameters used only with inputs we never pass (DINOv2's mask token needs `bool_masked_pos`).
_INPUT_ONLY = ("embeddings.mask_token",)


def unused_parameter_names(tower: nn.Module, feature_layer: int) -> list[str]:
    """Parameters of a transformers vision model that never reach its hidden states at ``feature_layer``: the encoder
    layers after it, the final norm and pooling head, and input-only parameters. They receive no gradient, so the
    model freezes them (DDP without ``find_unused_parameters`` would otherwise stop, and transformers' training
    tests expect frozen rather than gradient-less parameters)."""
    prefixes = []
    for path in _ENCODER_LAYERS:
        layers = _submodule(tower, path)
        if isinstance(layers, nn.ModuleList):
            total = len(layers)
            first_unused = total + 1 + feature_layer if feature_layer < 0 else feature_layer
            prefixes += [f"{path}.{index}." for index in range(max(first_unused, 0), total)]
            break
    prefixes += [f"{path}." for path in _AFTER_ENCODER if isinstance(_submodule(tower, path), nn.Module)]
    prefixes += [path for path in _INPUT_ONLY]
    return [name for name, _ in tower.named_parameters() if name.startswith(tuple(prefixes))]


def _submodule(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, patch_size: int):
    """Patch tokens of one tower at ``feature_layer`` (prefix tokens such as CLS and registers dropped), and all of
    the tower's hidden states.

    (images, 3, H, W) -> (images, (H / patch) * (W / patch), hidden), tuple of (images, tokens, hidden).
    """
    outputs = tower(pixel_values=pixel_values.to(tower.dtype), output_hidden_states=True)
    hidden = outputs.hidden_states[feature_layer]
    num_patches = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
    return hidden[:, -num_patches:], outputs.hidden_states  # CLIP/DINOv2 put prefix tokens first; SigLIP has none


class FusedVisionTower(nn.Module):
    """Two towers on one 6-channel ``pixel_values`` (each tower's own normalisation); features concatenated, first
    tower first (DINOv2 then SigLIP, as in Cobra and ML-Mamba)."""

    def __init__(self, config):
        super().__init__()
        self.first_tower = AutoModel.from_config(config.first_tower)
        self.second_tower = AutoModel.from_config(config.second_tower)
        self.patch_size = config.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.first_tower.dtype

    def unused_parameter_names(self, feature_layer: int) -> list[str]:
        return [f"{name}.{param}" for name in ("first_tower", "second_tower")
                for param in unused_parameter_names(getattr(self, name), feature_layer)]

    def forward(self, pixel_values: torch.Tensor, feature_layer: int):
        """(features, hidden states): patch features of both towers concatenated channel-wise, and the pair of the
        towers' hidden-state tuples."""
        if pixel_values.shape[1] != 6:
            raise ValueError(f"The fused vision tower expects 6-channel pixel_values (one normalisation per tower), got "
                             f"shape {tuple(pixel_values.shape)}; use MLMambaProcessor with `image_normalizations`.")
        first, first_hidden = patch_features(self.first_tower, pixel_values[:, :3], feature_layer, self.patch_size)
        second, second_hidden = patch_features(self.second_tower, pixel_values[:, 3:], feature_layer, self.patch_size)
        return torch.cat([first, second], dim=-1), (first_hidden, second_hidden)


class VisionTower(nn.Module):
    """One transformers vision model read at ``feature_layer``."""

    def __init__(self, config):
        super().__init__()
        self.model = AutoModel.from_config(config)
        self.patch_size = config.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def unused_parameter_names(self, feature_layer: int) -> list[str]:
        return [f"model.{name}" for name in unused_parameter_names(self.model, feature_layer)]

    def forward(self, pixel_values: torch.Tensor, feature_layer: int):
        """(features, hidden states): patch features at ``feature_layer`` and the tower's hidden states."""
        return patch_features(self.model, pixel_values, feature_layer, self.patch_size)


def build_vision_tower(vision_config) -> nn.Module:
    if vision_config.model_type == "ml_mamba_fused_vision":
        return FusedVisionTower(vision_config)
    return VisionTower(vision_config)
