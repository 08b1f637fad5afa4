"""The static-state decode step: one token through a Mamba-2 or Mamba-1 language model, in one function.

`generate` calls the model once per new token. transformers' Mamba models spend that call in generic machinery
(a module tree, output capturing, mask building, cache look-ups per layer); this step is the same arithmetic as a
straight line of tensor operations over the language model's weights and the cache's own conv and SSM state tensors,
which it updates in place. Those tensors are allocated once at prefill (transformers' linear-attention cache layers
keep static addresses), so a decode step allocates nothing state-sized and has static shapes: it compiles with
``torch.compile(fullgraph=True)``, and on CUDA it is captured as a CUDA graph and replayed per token
(`CUDAGraphStep`).

`MLMambaForConditionalGeneration.forward` takes this path for a cached one-token step without gradients, hidden
states or labels (what `generate` asks for), as ``config.decode_implementation`` says: ``"static"`` (default, eager),
``"graph"`` (CUDA graph on GPU), ``"compiled"`` (Inductor; a CUDA graph of the compiled step on GPU), or ``"eager"``
(transformers' own modules); on CPU a Mamba-2 model with float32 or int8 projections runs its static step (an
int8 model its compiled step too) as one call into C (`ml_mamba_cpu_kernels.Mamba2CStep`). The SSM state stays in
float32 whatever the weights' dtype. Otherwise, on CPU, the static step stores the language model's float32 weights
transposed once (`use_gemv_layout`), the layout in which MKL's matrix-vector product runs fastest; the compiled step
keeps the default layout and multiplies by a fused reduction instead (`project`). The reference it is tested
against is the eager path (`tests/test_decode.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ml_mamba_compat import advance_cache_count
from .ml_mamba_cpu_kernels import Mamba2CStep, cpu_kernels_available, ssm_step_reference
from .ml_mamba_quant import INT8_ACTIVATION_ROWS

LOG_DECAY_FLOOR = -80.0  # as ssd_step: exp() of anything below is 0 in float32
# Up to how many rows a compiled CPU step multiplies as a fused reduction rather than calling the BLAS / int8 kernel
# (`project`); measured on the 129M LM's weights, 2 threads, AVX-512 (benchmarks/RESULTS.md, "compiled GEMV").
REDUCTION_ROWS = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1, torch.int8: 1}


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for the rows ``x`` (b, in). Inside a compiled CPU step with few rows it is written as a fused
    multiply-reduce over the stored weight, ``(x[:, None, :] * W).sum(-1)`` (dequantized in registers for
    `Int8Linear`, accumulated in float32 for every dtype), which Inductor turns into one vectorized loop over all
    cores: at batch 1 it reads weights 1.6x (int8), 2.8x (bfloat16) and 1.7x (float32) faster than the int8 kernel
    and MKL's GEMV it replaces (`benchmarks/RESULTS.md`). Everywhere else it calls the layer, and always for an
    `Int8Linear` with int8 activations, whose own kernel reads int8 weights faster still."""
    if getattr(linear, "int8_activations", False):
        return linear(x)
    weight = getattr(linear, "weight_int8", None)
    if weight is None and type(linear) is nn.Linear:
        weight = linear.weight
    if (weight is None or x.device.type != "cpu" or not torch.compiler.is_compiling() or not weight.is_contiguous()
            or x.shape[0] > REDUCTION_ROWS.get(weight.dtype, 0)):
        return linear(x)
    y = (x.float()[:, None, :] * weight.float()).sum(-1)
    if weight.dtype == torch.int8:
        y = y * linear.scale.float()
    if linear.bias is not None:
        y = y + linear.bias.float()
    return y.to(x.dtype)


def _conv_step(conv1d: nn.Conv1d, conv_state: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Shift ``new`` (b, channels) into the window ``conv_state`` (b, channels, k) in place; returns the causal conv
    output (b, channels) in float32 (accumulated in float32 for low-precision weights), before the activation."""
    window = torch.cat([conv_state[:, :, 1:], new.to(conv_state.dtype)[:, :, None]], dim=-1)
    conv_state.copy_(window)
    out = (window.float() * conv1d.weight[:, 0].float()).sum(-1)
    return out + conv1d.bias.float() if conv1d.bias is not None else out


def _mamba2_mixer(mixer: nn.Module, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                  fused_ssm: bool = False):
    batch = x.shape[0]
    dtype = x.dtype
    heads, head_dim, groups, state_size = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    gate, xbc, dt = project(mixer.in_proj, x).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    xbc = F.silu(_conv_step(mixer.conv1d, conv_state, xbc)).to(dtype)
    x, B, C = xbc.split([mixer.intermediate_size, groups * state_size, groups * state_size], dim=-1)

    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    low, high = mixer.time_step_limit
    if low > 0.0 or high != float("inf"):
        dt = dt.clamp(min=low, max=high)
    A = -torch.exp(mixer.A_log.float())
    decay = (dt * A).clamp(min=LOG_DECAY_FLOOR).exp()
    # one pass over the state in our C kernel, or PyTorch's three (ml_mamba_cpu_kernels)
    update = torch.ops.ml_mamba.ssm_step if fused_ssm and ssm_state.is_contiguous() else ssm_step_reference
    y = update(ssm_state, x.float().view(batch, heads, head_dim), dt, decay, B.float().view(batch, groups, state_size),
               C.float().view(batch, groups, state_size), mixer.D.float())
    y = y.view(batch, mixer.intermediate_size).to(dtype)

    return project(mixer.out_proj, mixer.norm(y, gate).to(dtype))  # the mixer's own gated RMSNorm


def _mamba1_mixer(mixer: nn.Module, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                  fused_ssm: bool = False):
    dtype = x.dtype
    hidden, gate = project(mixer.in_proj, x).chunk(2, dim=-1)
    hidden = F.silu(_conv_step(mixer.conv1d, conv_state, hidden)).to(dtype)
    rank, state_size = mixer.time_step_rank, mixer.ssm_state_size
    time_step, B, C = project(mixer.x_proj, hidden).split([rank, state_size, state_size], dim=-1)
    dt = F.linear(time_step, mixer.dt_proj.weight).float()  # the bias is added in float32, as transformers does
    dt = F.softplus(dt + mixer.dt_proj.bias.float()) if mixer.dt_proj.bias is not None else F.softplus(dt)
    A = -torch.exp(mixer.A_log.float())  # (intermediate, state)
    ssm_state.mul_(torch.exp(dt[..., None] * A)).addcmul_((dt * hidden.float())[..., None], B.float()[:, None, :])
    y = torch.bmm(ssm_state, C.float()[..., None]).squeeze(-1) + hidden.float() * mixer.D.float()
    y = (y * F.silu(gate.float())).to(dtype)
    return project(mixer.out_proj, y)


def decode_step(language_model: nn.Module, lm_head: nn.Module, input_ids: torch.Tensor, conv_states: list,
                ssm_states: list, kind: str, fused_ssm: bool = False) -> torch.Tensor:
    """Logits (b, vocab) in float32 for ``input_ids`` (b, 1), the states (one per layer) advanced in place.
    ``fused_ssm`` updates Mamba-2 states with our one-pass C kernel (CPU only; `ml_mamba_cpu_kernels.ssm_step`)."""
    mixer_step = _mamba2_mixer if kind == "mamba2" else _mamba1_mixer
    hidden = language_model.embeddings(input_ids[:, 0])
    for block, conv_state, ssm_state in zip(language_model.layers, conv_states, ssm_states):
        # the block's own norms and residual, as transformers' Mamba blocks and models apply them
        residual = hidden.float() if block.residual_in_fp32 else hidden
        normed = block.norm(hidden.to(block.norm.weight.dtype))
        hidden = residual + mixer_step(block.mixer, normed, conv_state, ssm_state, fused_ssm)
    hidden = language_model.norm_f(hidden)
    return project(lm_head, hidden.to(input_dtype(lm_head))).float()


def input_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes: its weight's, or ``compute_dtype`` for a quantized layer."""
    return getattr(linear, "compute_dtype", None) or linear.weight.dtype


def store_transposed(linear: nn.Linear) -> None:
    """Keep ``linear.weight``'s values and shape, with its memory transposed (strides ``(1, out)``)."""
    linear.weight.data = linear.weight.data.t().contiguous().t()


def use_gemv_layout(module: nn.Module, enabled: bool = True) -> list[nn.Linear]:
    """Store every float32 CPU `nn.Linear` weight of ``module`` transposed in memory (same values, same shape, strides
    ``(1, out)``), or back in PyTorch's default layout with ``enabled=False``. A decode step multiplies each weight by
    one vector per sequence; in this layout the product runs as the BLAS's fast ``x @ W^T`` GEMV, 1.5x faster than
    in the default layout on our 2-core AVX-512 machine (18.8 vs 12.3 GB/s of weights, `benchmarks/RESULTS.md`), and
    prefill GEMMs are no slower. Tied weights stay tied (the parameter keeps its identity); `save_pretrained` saves
    the default layout. Returns the linear layers whose weight changed layout."""
    changed = []
    for linear in module.modules():
        weight = getattr(linear, "weight", None) if isinstance(linear, nn.Linear) else None
        if weight is None or weight.dim() != 2 or min(weight.shape) < 2:
            continue
        if enabled and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous():
            store_transposed(linear)
            changed.append(linear)
        elif not enabled and weight.t().is_contiguous() and not weight.is_contiguous():
            weight.data = weight.data.contiguous()
            changed.append(linear)
    return changed


class CUDAGraphStep:
    """A decode step captured as a CUDA graph and replayed per token, as mamba_ssm's ``update_graph_cache`` does:
    one launch per token instead of a few thousand kernel launches (the step's cost at batch 1 on a GPU).

    A graph records the addresses it reads and writes, so there is one per (batch size, cache state tensors); the
    cache's state tensors are allocated once per `generate` call and updated in place, so a graph is captured at
    the first step of a call (two warm-up steps on a side stream, states restored, then the capture) and replayed for
    the rest. Only the latest ``max_graphs`` graphs are kept (each holds a private memory pool). The token ids are
    copied into the graph's input buffer, and the logits copied out of its output buffer.
    """

    def __init__(self, step, max_graphs: int = 4):
        self.step, self.max_graphs = step, max_graphs
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, language_model, lm_head, input_ids, conv_states, ssm_states, kind, fused_ssm=False):
        states = list(conv_states) + list(ssm_states)
        key = (tuple(input_ids.shape), tuple(state.data_ptr() for state in states))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(language_model, lm_head, input_ids, conv_states, ssm_states, kind,
                                             fused_ssm, states)
        graph, static_ids, static_logits = self.graphs[key]
        static_ids.copy_(input_ids)
        graph.replay()
        return static_logits.clone()

    def _capture(self, language_model, lm_head, input_ids, conv_states, ssm_states, kind, fused_ssm, states):
        static_ids = input_ids.clone()
        saved = [state.clone() for state in states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy initialisations, autotuning) outside the capture
            for _ in range(2):
                self.step(language_model, lm_head, static_ids, conv_states, ssm_states, kind, fused_ssm)
        torch.cuda.current_stream().wait_stream(side)
        for state, copy in zip(states, saved):  # the warm-up advanced the states: put them back
            state.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the states advance at each replay
            static_logits = self.step(language_model, lm_head, static_ids, conv_states, ssm_states, kind, fused_ssm)
        return graph, static_ids, static_logits


class StaticDecoder:
    """Runs `decode_step` on a model's language model and head: eager, compiled (one compiled graph per batch size
    and dtype; ``dynamic=False`` keeps shapes static) and/or, on CUDA, captured as a CUDA graph (`CUDAGraphStep`).
    ``graph`` is ignored on CPU."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, kind: str, compiled: bool = False,
                 graph: bool = False):
        if kind not in ("mamba2", "mamba"):
            raise ValueError(f"The static decode step supports mamba2 and mamba language models, got {kind!r}.")
        self.language_model, self.lm_head, self.kind = language_model, lm_head, kind
        device = next(language_model.parameters()).device
        self.graph = graph = (graph or compiled) and device.type == "cuda"
        # Mamba-2 states through our one-pass C kernel on CPU (~2.5x less time on the states of the 129M LM)
        self.fused_ssm = device.type == "cpu" and kind == "mamba2" and cpu_kernels_available()
        # Mamba-2 on CPU: the whole step in C (ml_mamba_cpu_kernels.Mamba2CStep) for the static step, and for the
        # compiled one of int8 models (Inductor's float32 step is as fast, and what "compiled" asks for)
        native = (device.type == "cpu" and kind == "mamba2" and Mamba2CStep.eligible(language_model, lm_head)
                  and (not compiled or getattr(lm_head, "int8_activations", False)))
        # eager: MKL's GEMV wants the transposed layout; compiled and C: the default one
        use_gemv_layout(language_model, enabled=not compiled and not native)
        use_gemv_layout(lm_head, enabled=not compiled and not native)
        self.native = Mamba2CStep(language_model, lm_head) if native else None
        self.step = decode_step
        if compiled:
            # On CUDA we capture the compiled step ourselves (`CUDAGraphStep`) rather than with
            # mode="reduce-overhead", whose CUDA-graph trees skip functions that mutate their inputs (the states).
            self.step = torch.compile(decode_step, fullgraph=True, dynamic=False)
        if graph:
            self.step = CUDAGraphStep(self.step)

    def __call__(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        layers = range(len(self.language_model.layers))
        conv_states = [cache.get_conv_state(i) for i in layers]
        ssm_states = [cache.get_recurrent_state(i) for i in layers]
        if (self.native is not None and input_ids.shape[0] <= INT8_ACTIVATION_ROWS
                and all(state.is_contiguous() for state in conv_states + ssm_states)):
            logits = self.native(input_ids, conv_states, ssm_states)
        else:
            logits = self.step(self.language_model, self.lm_head, input_ids, conv_states, ssm_states, self.kind,
                               self.fused_ssm)
        for i in layers:
            advance_cache_count(cache, i)
        return logits


def can_decode_statically(language_model: nn.Module, cache) -> bool:
    """A SiLU Mamba LM whose cache holds a float32 SSM state and a conv window for every layer and does not record
    its past (speculative decoding)."""
    if cache is None or not cache.has_previous_state(0):
        return False
    if any(block.mixer.activation not in ("silu", "swish") for block in language_model.layers):
        return False
    num_layers = len(language_model.layers)
    for i in range(num_layers):
        state = cache.get_recurrent_state(i)
        if state is None or state.dtype != torch.float32 or cache.get_conv_state(i) is None:
            return False
        if cache.is_recording_past(i):
            return False
    return True


__all__ = ["StaticDecoder", "CUDAGraphStep", "project", "store_transposed", "use_gemv_layout", "can_decode_statically",
           "decode_step"]
