"""A fast PyTorch path for transformers' Mamba-2 language model on CPU, without forking transformers.

transformers' `Mamba2Model` falls back, without mamba-ssm kernels, to reference PyTorch code that is written for
clarity: a chunked scan with a quadratic inter-chunk step, heads expanded over B/C groups, a `conv1d` call per
decoded token. `FastMamba2Mixer(Mamba2Mixer)` replaces only the mixer's CPU forward and keeps everything else
(weights, state-dict keys, config, the `DynamicCache` of `LinearAttentionLayer`s, left-padding masks, `generate`,
autograd):

* prefill: `ssd_chunked` with a CPU-tuned chunk size (`CPU_CHUNK_SIZE`); when no gradient is tracked, long inputs go through the whole
  mixer (projections, conv, scan, norm) in segments of `prefill_segment` tokens, carrying the conv window and the
  state, so intermediates stay bounded and prefill memory grows only with the (tokens x hidden) activations;
* decode: `ssd_step` (state updated in place in the cache) and an in-place causal-conv window;
* on CUDA, under `torch.compile`/export, with packed sequences (`seq_idx`, `cu_seqlens`) or a cache that records
  its past, transformers' own forward runs (with mamba-ssm / causal-conv1d kernels when they are installed).

`enable_fast_mamba2(module)` swaps the class of every `Mamba2Mixer` in a module tree (`enabled=False` swaps back);
the subclass adds no parameters, so checkpoints are unchanged. `MLMambaModel` does this when it is built, unless
the config says ``use_fast_cpu_path=False``.

```python
>>> from modeling_ml_mamba.ml_mamba_fast_mamba2 import enable_fast_mamba2
>>> enable_fast_mamba2(model, enabled=False)  # back to transformers' reference path, e.g. to compare
```
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ml_mamba_compat import CACHE_NAME, Mamba2Mixer, advance_cache_count, force_accelerate_hooks, pick_cache
from .ml_mamba_norm import gated_rms_norm, inverse_rms
from .ml_mamba_scan import causal_depthwise_conv1d
from .ml_mamba_ssd import CPU_CHUNK_SIZE, ssd_chunked, ssd_step

# Tokens per prefill segment when no gradient is tracked.
PREFILL_SEGMENT = 1024
# Keyword arguments only mamba-ssm's kernels understand; with them the mixer defers to transformers. (``seq_idx``
# without a cache, packed training sequences, runs here: the conv and the scan reset at every boundary.)
_KERNEL_ONLY_KWARGS = ("cu_seqlens", "cu_seq_lens", "position_ids")


def apply_mask_to_padding_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the states of padding positions (left padding), as transformers' Mamba-2 does."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def _on_fast_path(tensor: torch.Tensor, cache_params, kwargs, layer_idx: int | None = None) -> bool:
    """CPU, eager, no kernel-only arguments, and a cache that does not record its past (speculative decoding)."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if any(kwargs.get(name) is not None for name in _KERNEL_ONLY_KWARGS):
        return False
    if cache_params is None:
        return True
    if kwargs.get("seq_idx") is not None:  # packed sequences with a cache: transformers' (kernel) path
        return False
    layers = range(len(cache_params.layers)) if layer_idx is None else (layer_idx,)
    return not any(cache_params.is_recording_past(i) for i in layers)


class FastMamba2Mixer(Mamba2Mixer):
    """`Mamba2Mixer` with a fast CPU forward (same weights, same cache, same results up to float32 rounding)."""

    cpu_chunk_size = CPU_CHUNK_SIZE
    prefill_segment = PREFILL_SEGMENT

    @force_accelerate_hooks("conv1d")
    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                cache_params=None, **kwargs):
        cache_params = pick_cache(cache, cache_params)  # `cache` from transformers 5.24 on
        if not _on_fast_path(hidden_states, cache_params, kwargs, self.layer_idx):
            return super().forward(hidden_states, attention_mask=attention_mask, **{CACHE_NAME: cache_params},
                                   **kwargs)
        if (cache_params is not None and hidden_states.shape[1] == 1
                and cache_params.get_conv_state(self.layer_idx) is not None
                and cache_params.get_recurrent_state(self.layer_idx) is not None):
            return self._decode_step(hidden_states, cache_params)
        if kwargs.get("seq_idx") is not None:
            return self._packed_scan(hidden_states, kwargs["seq_idx"], attention_mask)
        return self._scan(hidden_states, cache_params, attention_mask)

    def _packed_scan(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor, attention_mask) -> torch.Tensor:
        """Packed sequences (padding-free training): several samples in one row, ``seq_idx`` (b, l) saying which
        token belongs to which; the conv and the SSM state restart at every boundary, so each sample is computed
        exactly as alone (tests/test_packing.py)."""
        return self._scan_segment(hidden_states, attention_mask, None, None, want_state=False, seq_idx=seq_idx)[0]

    def _gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """`self.norm(y, gate)`: RMSNorm of y * silu(gate) per group, times the weight. Overwrites ``gate``."""
        if y.dtype != torch.float32 or gate.dtype != torch.float32 or (torch.is_grad_enabled() and (
                y.requires_grad or gate.requires_grad or self.norm.weight.requires_grad)):
            return gated_rms_norm(y, gate, self.norm.weight, self.norm.group_size, self.norm.variance_epsilon)
        # In place over the caller's gate: ~3x fewer memory passes than the reference.
        gated = F.silu(gate, inplace=True).mul_(y).unflatten(-1, (-1, self.norm.group_size))
        return gated.mul_(inverse_rms(gated, self.norm.variance_epsilon)).flatten(-2).mul_(self.norm.weight)

    def _split_xbc(self, xbc: torch.Tensor):
        groups_state = self.n_groups * self.ssm_state_size
        return xbc.split([self.intermediate_size, groups_state, groups_state], dim=-1)

    def _decode_step(self, hidden_states: torch.Tensor, cache_params) -> torch.Tensor:
        """One token: conv window and SSM state updated in place in the cache (no allocation of state-sized tensors)."""
        batch = hidden_states.shape[0]
        dtype = hidden_states.dtype
        conv_state = cache_params.get_conv_state(self.layer_idx)  # (b, conv_dim, k)
        ssm_state = cache_params.get_recurrent_state(self.layer_idx)  # (b, h, p, n)
        gate, xbc, dt = self.in_proj(hidden_states[:, 0]).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        window = torch.cat([conv_state[:, :, 1:], xbc.to(conv_state.dtype)[:, :, None]], dim=-1)
        conv_state.copy_(window)
        window = window.float() if window.dtype in (torch.float16, torch.bfloat16) else window  # accumulate in fp32
        xbc = (window * self.conv1d.weight[:, 0].to(window.dtype)).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias.to(window.dtype)
        xbc = self.act(xbc).to(dtype)

        x, B, C = self._split_xbc(xbc)
        y, new_state = ssd_step(
            ssm_state, x.view(batch, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.view(batch, self.n_groups, self.ssm_state_size), C.view(batch, self.n_groups, self.ssm_state_size),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.time_step_limit,
        )
        if new_state is not ssm_state:  # autograd or a low-precision cache: write the new state back
            cache_params.update_recurrent_state(new_state, self.layer_idx)
        advance_cache_count(cache_params, self.layer_idx)
        y = self._gated_norm(y.view(batch, 1, self.intermediate_size), gate[:, None])
        return self.out_proj(y.to(dtype))

    def _scan(self, hidden_states: torch.Tensor, cache_params, attention_mask) -> torch.Tensor:
        """Prefill, or a cache-free forward (training): segment by segment when no gradient is tracked."""
        batch, length, _ = hidden_states.shape
        kernel = self.conv_kernel_size
        previous_conv = state = None
        if cache_params is not None:
            previous_conv = cache_params.get_conv_state(self.layer_idx)  # (b, conv_dim, k) or None
            state = cache_params.get_recurrent_state(self.layer_idx)  # (b, h, p, n) or None
        # The k - 1 conv inputs before the current token: the cached window, or zeros at the start.
        context = (previous_conv[:, :, 1:].transpose(1, 2) if previous_conv is not None
                   else hidden_states.new_zeros(batch, kernel - 1, self.conv_dim))
        segment = self.prefill_segment if not torch.is_grad_enabled() else length
        outputs = []
        for start in range(0, length, segment):
            end = min(start + segment, length)
            mask = attention_mask[:, start:end] if attention_mask is not None else None
            out, window, state = self._scan_segment(hidden_states[:, start:end], mask, context, state,
                                                    want_state=cache_params is not None or end < length)
            context = window[:, 1:]
            outputs.append(out)
        if cache_params is not None:  # the last k conv inputs (zeros before the start) and the final state
            cache_params.update_conv_state(window.transpose(1, 2), self.layer_idx, conv_kernel_size=kernel)
            advance_cache_count(cache_params, self.layer_idx, length - kernel)  # it counted the window's k tokens
            # contiguous: the scan returns it transposed, and the decode step's one-pass kernel wants (b, h, p, n)
            cache_params.update_recurrent_state(state.contiguous(), self.layer_idx)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _scan_segment(self, hidden_states, attention_mask, context, state, want_state, seq_idx=None):
        """The mixer over one segment after ``context`` (the k - 1 conv inputs before it) and ``state``: returns the
        output, the last k conv inputs (the conv window) and the SSM state after the segment. With ``seq_idx``
        (packed samples; no context, state or window) the conv and the scan restart at every sample boundary."""
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        silu = self.activation in ("silu", "swish")
        if seq_idx is not None:
            window = None
            conv_out = causal_depthwise_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, silu=silu,
                                               seq_idx=seq_idx)
        else:
            window = torch.cat([context.to(xbc.dtype), xbc[:, -self.conv_kernel_size:]], dim=1)
            window = window[:, -self.conv_kernel_size:]
            # In place over the projection's xbc columns (a fresh tensor of ours; the window above is a copy).
            conv_out = causal_depthwise_conv1d(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, context, silu=silu,
                                               inplace=True)
        conv_out = conv_out if silu else self.act(conv_out)
        conv_out = apply_mask_to_padding_states(conv_out, attention_mask)

        x, B, C = self._split_xbc(conv_out)
        result = ssd_chunked(
            x.reshape(batch, length, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.n_groups, self.ssm_state_size),
            C.reshape(batch, length, self.n_groups, self.ssm_state_size),
            self.cpu_chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.time_step_limit,
            initial_state=state, return_final_state=want_state, seq_idx=seq_idx,
        )
        y, state = result if want_state else (result, None)
        y = self._gated_norm(y.reshape(batch, length, self.intermediate_size), gate)
        return self.out_proj(y.to(dtype)), window, state


def enable_fast_mamba2(module: nn.Module, enabled: bool = True) -> int:
    """Swap every transformers `Mamba2Mixer` in ``module`` for `FastMamba2Mixer` (or back, with ``enabled=False``).

    Only the exact classes are swapped (subclasses from other models are left alone); returns how many modules
    changed class.
    """
    source, target = (Mamba2Mixer, FastMamba2Mixer) if enabled else (FastMamba2Mixer, Mamba2Mixer)
    changed = 0
    for submodule in module.modules():
        if type(submodule) is source:
            submodule.__class__ = target
            changed += 1
    return changed


__all__ = ["FastMamba2Mixer", "enable_fast_mamba2", "CPU_CHUNK_SIZE", "PREFILL_SEGMENT"]
