"""The gated RMSNorm of Mamba-2: RMSNorm(y * silu(gate)) per group of channels, times a learned weight.

Ours rather than transformers' (renamed from ``MambaRMSNormGated`` to ``Mamba2RMSNormGated`` in 5.25): a few lines,
the same parameter name (``weight``) and attributes, so checkpoints and the fast path read it the same way.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm(y * silu(gate))`` with the mean square taken over groups of ``group_size`` channels,
    computed in float32 and returned in the input's dtype (as Mamba-2 does, ``norm_before_gate=False``)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of group_size ({group_size}).")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * nn.functional.silu(gate.to(torch.float32))
        grouped = hidden_states.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, group_size={self.group_size}, eps={self.variance_epsilon}"


__all__ = ["GatedRMSNorm"]
