"""The gated RMSNorm of Mamba-2: RMSNorm(y * silu(gate)) per group of channels, times a learned weight.

Ours rather than transformers' (renamed from ``MambaRMSNormGated`` to ``Mamba2RMSNormGated`` in 5.25): a few lines,
the same parameter name (``weight``) and attributes, so checkpoints and the fast path read it the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ml_mamba_ssd import needs_autograd


def gated_rms_norm(hidden_states: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    """``weight * rmsnorm(hidden_states * silu(gate))`` over groups of ``group_size`` channels, in float32 (or
    float64); the result in the promoted dtype of the input and the weight (as transformers' ``Mamba2RMSNormGated``)."""
    if needs_autograd(hidden_states, gate, weight):
        return _GatedRMSNorm.apply(hidden_states, gate, weight, group_size, eps)
    return _GatedRMSNorm.forward(None, hidden_states, gate, weight, group_size, eps)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:  # float32, or float64 for float64 inputs
    return torch.promote_types(tensor.dtype, torch.float32)


def _gated(hidden_states, gate):  # a new tensor (the callers write over it)
    if gate is None:
        return hidden_states.to(_compute_dtype(hidden_states), copy=True)
    hidden_states = hidden_states.to(_compute_dtype(hidden_states))
    return hidden_states * F.silu(gate.to(hidden_states.dtype))


def inverse_rms(grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean square + eps) over the last dim, (..., 1): the mean square from one `vector_norm` pass."""
    scale = torch.linalg.vector_norm(grouped, dim=-1, keepdim=True).square_().div_(grouped.shape[-1])
    return scale.add_(eps).rsqrt_()


class _GatedRMSNorm(torch.autograd.Function):
    """The gated RMSNorm with a hand-written backward: it keeps the inputs and the per-group scale (not five
    full-size intermediates) and needs ~3x fewer passes over memory than autograd through the reference ops."""

    @staticmethod
    def forward(ctx, hidden_states, gate, weight, group_size, eps):
        grouped = _gated(hidden_states, gate).unflatten(-1, (-1, group_size))
        scale = inverse_rms(grouped, eps)  # (..., groups, 1)
        if ctx is not None:
            ctx.save_for_backward(hidden_states, gate, weight, scale)
            ctx.group_size = group_size
        out_dtype = torch.promote_types(hidden_states.dtype, weight.dtype)
        return grouped.mul_(scale).flatten(-2).mul_(weight.to(grouped.dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden_states, gate, weight, scale = ctx.saved_tensors
        normed = _gated(hidden_states, gate).unflatten(-1, (-1, ctx.group_size)).mul_(scale)
        grad = grad.to(normed.dtype).unflatten(-1, (-1, ctx.group_size))
        grad_weight = (grad * normed).sum(tuple(range(grad.dim() - 2))).flatten() if ctx.needs_input_grad[2] else None
        grad_normed = grad.mul(weight.to(normed.dtype).view(normed.shape[-2:]))
        # rmsnorm: d/du of u * scale(u) = scale * (dn - n * mean(dn * n)) per group
        mean = (grad_normed * normed).mean(-1, keepdim=True)
        grad_gated = grad_normed.sub_(normed.mul_(mean)).mul_(scale).flatten(-2)
        grad_hidden = grad_gate = None
        if gate is None:
            grad_hidden = grad_gated
        else:
            gate_float = gate.to(normed.dtype)
            if ctx.needs_input_grad[0]:
                grad_hidden = grad_gated * F.silu(gate_float)
            if ctx.needs_input_grad[1]:
                grad_gate = torch.ops.aten.silu_backward(grad_gated.mul_(hidden_states.to(normed.dtype)), gate_float)
        return (grad_hidden.to(hidden_states.dtype) if grad_hidden is not None else None,
                grad_gate.to(gate.dtype) if grad_gate is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None)


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
        return gated_rms_norm(hidden_states, gate, self.weight, self.group_size, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, group_size={self.group_size}, eps={self.variance_epsilon}"


__all__ = ["GatedRMSNorm", "gated_rms_norm", "inverse_rms"]
