"""Connectors: map vision features (batch, tokens, vision_dim) to language-model embeddings (batch, tokens', text_dim).

* ``mlp``       LLaVA: Linear -> GELU -> Linear.
* ``fused-mlp`` Cobra's "fused-gelu-mlp": Linear(dv -> 4 dv) -> GELU -> Linear(-> d) -> GELU -> Linear(d -> d).
* ``ldp``       LDPv2 (MobileVLM v2, Cobra's ablation): fused MLP without the last layer, average-pooled to a
                smaller grid, then a depthwise 3x3 conv position injection with residual.
* ``msc``       ML-Mamba's Mamba-2 Scan Connector: Linear -> GELU -> N blocks of [multi-directional Mamba-2
                mixer + residual; LayerNorm -> SwiGLU + residual] -> LayerNorm -> fused GELU MLP.
* ``vss-l2``    VL-Mamba's VSS-L2: Linear -> GELU -> VSS (2D scan) + skip -> LayerNorm -> Linear.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .configuration_ml_mamba import CONNECTOR_TYPES
from .ml_mamba_scan import MultiScanMamba2Mixer


class MLPConnector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features):
        return self.linear_2(F.gelu(self.linear_1(features)))


class FusedMLPConnector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.linear_2 = nn.Linear(4 * vision_dim, text_dim)
        self.linear_3 = nn.Linear(text_dim, text_dim)

    def forward(self, features):
        return self.linear_3(F.gelu(self.linear_2(F.gelu(self.linear_1(features)))))


class LDPConnector(nn.Module):
    """LDPv2: fused MLP, AdaptiveAvgPool2d to ``pool_size`` x ``pool_size`` tokens, depthwise 3x3 conv + residual."""

    def __init__(self, vision_dim: int, text_dim: int, pool_size: int = 14):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.linear_2 = nn.Linear(4 * vision_dim, text_dim)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.position_conv = nn.Conv2d(text_dim, text_dim, kernel_size=3, padding=1, groups=text_dim)

    def forward(self, features):
        features = self.linear_2(F.gelu(self.linear_1(features)))
        batch, tokens, dim = features.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"The ldp connector needs a square patch grid, got {tokens} visual tokens.")
        grid = features.transpose(1, 2).reshape(batch, dim, side, side)  # (b, d, side, side)
        grid = self.pool(grid)
        grid = grid + self.position_conv(grid)
        return grid.flatten(2).transpose(1, 2)


class SwiGLU(nn.Module):
    """w3(SiLU(w1 x) * w2 x), with biases, as in ML-Mamba's scan blocks."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ScanBlock(nn.Module):
    """One MSC block: x + mixer(x), then x + SwiGLU(LayerNorm(x)) in the "Advanced" form (no MLP in "Basic").

    As in the released code, the mixer has no pre-norm (the block is the authors' ``bimamba_type="v2"`` block).
    """

    def __init__(self, dim: int, mixer_kwargs: dict, use_swiglu: bool, layer_norm_epsilon: float = 1e-5):
        super().__init__()
        self.mixer = MultiScanMamba2Mixer(dim, **mixer_kwargs)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_epsilon) if use_swiglu else None
        self.mlp = SwiGLU(dim, dim) if use_swiglu else None

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.mixer(hidden_states)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.norm(hidden_states))
        return hidden_states


class MSCConnector(nn.Module):
    """ML-Mamba's Mamba-2 Scan Connector (BSM or CSM scan, Basic or Advanced blocks)."""

    def __init__(self, vision_dim: int, text_dim: int, mixer_kwargs: dict, num_blocks: int = 2,
                 use_swiglu: bool = True):
        super().__init__()
        self.input_proj = nn.Linear(vision_dim, text_dim)
        self.blocks = nn.ModuleList(ScanBlock(text_dim, mixer_kwargs, use_swiglu) for _ in range(num_blocks))
        self.norm_f = nn.LayerNorm(text_dim)
        self.projector = FusedMLPConnector(text_dim, text_dim)

    def forward(self, features):
        hidden_states = F.gelu(self.input_proj(features))
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.projector(self.norm_f(hidden_states))


class VSSConnector(nn.Module):
    """VL-Mamba's VSS-L2: Linear -> GELU -> [x + VSS(LayerNorm(x))] -> LayerNorm -> Linear.

    VL-Mamba's VSS uses a Mamba-1 selective scan; we use the same Mamba-2 scan as MSC (one scan implementation for
    every connector). The pre-norm inside VSS follows VMamba's VSS block.
    """

    def __init__(self, vision_dim: int, text_dim: int, mixer_kwargs: dict):
        super().__init__()
        self.input_proj = nn.Linear(vision_dim, text_dim)
        self.vss_norm = nn.LayerNorm(text_dim)
        self.mixer = MultiScanMamba2Mixer(text_dim, **mixer_kwargs)
        self.norm = nn.LayerNorm(text_dim)
        self.output_proj = nn.Linear(text_dim, text_dim)

    def forward(self, features):
        hidden_states = F.gelu(self.input_proj(features))
        hidden_states = hidden_states + self.mixer(self.vss_norm(hidden_states))
        return self.output_proj(self.norm(hidden_states))


def build_connector(config, vision_dim: int, text_dim: int) -> nn.Module:
    """The connector named by ``config.connector_type``."""
    kind = config.connector_type
    if kind == "mlp":
        return MLPConnector(vision_dim, text_dim)
    if kind == "fused-mlp":
        return FusedMLPConnector(vision_dim, text_dim)
    if kind == "ldp":
        return LDPConnector(vision_dim, text_dim, config.connector_pool_size)
    mixer_kwargs = config.connector_mixer_kwargs()
    if kind == "msc":
        return MSCConnector(vision_dim, text_dim, mixer_kwargs, config.connector_num_blocks,
                            config.connector_use_swiglu)
    if kind == "vss-l2":
        return VSSConnector(vision_dim, text_dim, mixer_kwargs)
    raise ValueError(f"Unknown connector_type {kind!r}: expected one of {CONNECTOR_TYPES}.")
