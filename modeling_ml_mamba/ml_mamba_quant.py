"""Inference-only linear layers for CPU decoding: int8 weight-only (`quantize_int8`) and float32 weights split for
a multi-core matrix-vector product (`split_gemv`).

`quantize_int8(model)` replaces the language model's and the LM head's `nn.Linear` layers with `Int8Linear`:
symmetric per-output-channel int8 weights with one scale per row. Up to `INT8_ACTIVATION_ROWS` rows (decoding) they
multiply activations quantized to int8 per block of 32 values (llama.cpp's Q8_0 scheme) with our VNNI / AVX2 kernel
(`ml_mamba_cpu_kernels`), the fastest here at every such row count; more rows (prefill) go through
``torch.ops.aten._weight_int8pack_mm`` (the CPU kernel torchao's int8 weight-only mode also ends in) with bfloat16
activations, 4.2x faster per weight byte than float32 `F.linear` at batch 1 here (`benchmarks/RESULTS.md`).
Everything else keeps its dtype: the embeddings, the norms, `A_log`, `D`, `dt_bias`, the conv and the recurrent state
stay in float32 (low-precision state is a known source of drift in Mamba models). Off CPU, or where the kernel is
missing, the layer dequantizes and runs a plain matmul (the reference it is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ml_mamba_cpu_kernels import fast_int8_gemv_available

# Up to how many rows `Int8Linear` quantizes its activations to int8 for our kernel (2 threads, AVX-512 VNNI, the
# 129M LM's weights: 1.5-2x faster than `_weight_int8pack_mm` from 1 to 16 rows; benchmarks/RESULTS.md).
INT8_ACTIVATION_ROWS = 16


def _int8pack_mm():
    return getattr(torch.ops.aten, "_weight_int8pack_mm", None)


class Int8Linear(nn.Module):
    """``y = x @ (scale * W_int8)^T + bias``, weights int8 per output channel (symmetric, round to nearest).

    ``int8_activations`` (default: where our kernel builds and has AVX2 or VNNI) quantizes the activations of calls
    with up to `INT8_ACTIVATION_ROWS` rows to int8 per block of 32 values for the int8 kernel; otherwise, and for
    more rows, they enter PyTorch's kernel in bfloat16."""

    def __init__(self, linear: nn.Linear, int8_activations: bool | None = None):
        super().__init__()
        self.int8_activations = fast_int8_gemv_available() if int8_activations is None else int8_activations
        weight = linear.weight.detach().float()
        # The kernel takes bfloat16 scales: quantize with the stored (rounded up, so |w| / scale <= 127) scale itself.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0 * (1 + 2**-7)).to(torch.bfloat16)
        self.register_buffer("weight_int8", torch.round(weight / scale.float()[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs may come in (any float dtype works; the kernel runs in bfloat16)."""
        return torch.float32

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), for code that reads ``.weight`` (e.g. its dtype or shape)."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _int8pack_mm()
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.int8_activations and x.device.type == "cpu" and flat.shape[0] <= INT8_ACTIVATION_ROWS:
            y = torch.ops.ml_mamba.int8_gemv(flat, self.weight_int8, self.scale).to(x.dtype)
        elif kernel is not None and x.device.type == "cpu":
            y = kernel(flat.to(torch.bfloat16), self.weight_int8, self.scale).to(x.dtype)
        else:
            y = F.linear(flat, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        activations = f"int8 up to {INT8_ACTIVATION_ROWS} rows" if self.int8_activations else "bfloat16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, "
                f"activations: {activations}")


def quantize_int8(model: nn.Module, int8_activations: bool | None = None) -> int:
    """Replace the `nn.Linear` layers of an ML-Mamba model's language model (Mamba-1's small ``dt_proj`` excepted) and
    its LM head with `Int8Linear`, in place, for inference (such a model is not meant to be saved). The vision tower
    and connector keep their weights; a tied LM head gets its own int8 copy and the embedding keeps its float
    weights. ``int8_activations``: see `Int8Linear` (``False`` keeps bfloat16 activations everywhere). Returns how
    many layers were replaced."""
    return _replace_linears(model, lambda linear: Int8Linear(linear, int8_activations))


@torch.library.custom_op("ml_mamba::blocked_matmul", mutates_args=())
def blocked_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(n, in) @ blocks (parts, in, out / parts) -> (n, out): one batched matmul, blocks side by side. An opaque op
    for `torch.compile`, which otherwise lowers this batched matrix-vector product to a slower kernel."""
    return torch.matmul(x, blocks).transpose(0, 1).reshape(x.shape[0], blocks.shape[0] * blocks.shape[2])


@blocked_matmul.register_fake
def _(x, blocks):
    return x.new_empty(x.shape[0], blocks.shape[0] * blocks.shape[2])


class SplitGemvLinear(nn.Module):
    """`nn.Linear` with the weight stored as ``parts`` blocks of output rows, each transposed: (parts, in, out / parts).

    One batched matmul then runs one matrix-vector product per block, on every core: MKL runs a single GEMV on one
    thread, so at batch 1 this reads float32 weights at 24.9 GB/s on our 2-core machine against 16.8 GB/s for the
    transposed layout of `use_gemv_layout` and 12.3 GB/s for PyTorch's default (and it is faster at batch 8 too:
    49.8 vs 69 ms for the 129M LM's weights; `benchmarks/RESULTS.md`). Same values; inference only."""

    def __init__(self, linear: nn.Linear, parts: int = 2):
        super().__init__()
        out_features, in_features = linear.weight.shape
        parts = parts if out_features % parts == 0 else 1
        blocks = linear.weight.detach().view(parts, out_features // parts, in_features).transpose(1, 2)
        self.register_buffer("weight_blocks", blocks.contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_blocks.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, assembled (a copy), for code that reads ``.weight``."""
        return self.weight_blocks.transpose(1, 2).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = blocked_matmul(flat.contiguous(), self.weight_blocks)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.weight_blocks.shape[0]}")


def _replace_linears(model: nn.Module, make) -> int:
    """Swap the language model's `nn.Linear` layers (Mamba-1's ``dt_proj`` excepted) and the LM head for
    ``make(linear)``."""
    base = getattr(model, "model", model)
    targets = [(name, module) for name, module in base.language_model.named_modules()
               if isinstance(module, nn.Linear) and not name.endswith("dt_proj")]  # Mamba-1's dt feeds exp(): kept
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(base.language_model.get_submodule(parent) if parent else base.language_model, child, make(module))
    replaced = len(targets)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = make(model.lm_head)
        replaced += 1
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # the head is no longer the embedding
    model.__dict__.pop("_decoder", None)  # the static decoder refers to the old head
    return replaced


def split_gemv(model: nn.Module, parts: int | None = None) -> int:
    """Replace the language model's and the LM head's float32 `nn.Linear` layers with `SplitGemvLinear` (``parts``
    defaults to torch's thread count), in place, for CPU inference. A tied head gets its own copy (the embedding
    keeps its weights). Returns how many layers were replaced."""
    parts = parts or max(torch.get_num_threads(), 1)
    return _replace_linears(model, lambda linear: SplitGemvLinear(linear, parts))


__all__ = ["Int8Linear", "SplitGemvLinear", "quantize_int8", "split_gemv"]
