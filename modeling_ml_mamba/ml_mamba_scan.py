"""Multi-directional Mamba-2 mixers over a grid of visual tokens: ML-Mamba's BSM and CSM scans.

One mixer serves every connector that scans (MSC, VSS-L2). The input projection, the gated RMSNorm and the
output projection are shared by all directions; each direction has its own causal conv1d, ``dt_bias``, ``A_log``
and ``D`` (initialised as copies), exactly as in the authors' bidirectional Mamba-2 (their mamba_ssm fork,
``bimamba_type="v2"``). Each direction scans the tokens in its own order, is put back into patch order, normalised
with the shared gate, and the directions are averaged before the output projection.

* ``"bidirectional"`` (BSM): forward and reversed sequence.
* ``"cross"`` (CSM, the paper's cross scan; not in the released code): the patch grid read row by row and column by
  column, each forwards and backwards (four sequences).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ml_mamba_norm import GatedRMSNorm
from .ml_mamba_ssd import needs_autograd, ssd_scan

try:  # GPU fast path for the depthwise causal convolution
    from causal_conv1d import causal_conv1d_fn
except Exception:
    causal_conv1d_fn = None

SCAN_DIRECTIONS = {"bidirectional": 2, "cross": 4}


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            previous: torch.Tensor | None = None, silu: bool = False, inplace: bool = False,
                            block: int = 256, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv1d over (batch, length, channels), in that layout, optionally followed by SiLU.

    weight (channels, k), bias (channels,), previous (batch, k - 1, channels): the inputs before ``x`` (zeros if
    None). Written as k shifted multiply-adds, which on CPU beats `F.conv1d` and the two transposes it would need
    here. It works ``block`` rows at a time (the k passes stay in cache) and, without autograd and with
    ``inplace``, writes the result over ``x`` (last block first), which saves allocating (and page-faulting) an
    output as large as the input. Accumulates in float32 for float16/bfloat16 inputs. With ``seq_idx`` (b, l),
    packed sequences: no input reaches across a boundary, each sequence starts from zeros as it would alone (no
    ``previous`` then). Differentiable through a hand-written backward (`_CausalConv1d`).
    """
    if seq_idx is not None and previous is not None:
        raise ValueError("causal_depthwise_conv1d: packed sequences (seq_idx) start from zeros; pass no `previous`.")
    if seq_idx is not None:
        seq_idx = seq_idx.to(x.device).expand(x.shape[0], x.shape[1])
    if needs_autograd(x, weight, bias, previous):
        return _CausalConv1d.apply(x, weight, bias, previous, silu, seq_idx, block)
    return _conv_rows(x, weight, bias, previous, silu, seq_idx, block, inplace)


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _same_sequence(seq_idx: torch.Tensor | None, lag: int, start: int, end: int) -> torch.Tensor | None:
    """(b, end - start, 1): whether token t - lag belongs to token t's sequence, for t in [start, end)."""
    if seq_idx is None:
        return None
    return (seq_idx[:, start:end] == seq_idx[:, start - lag:end - lag])[..., None]


def _conv_rows(x, weight, bias, previous, silu, seq_idx, block, inplace):
    """The forward, ``block`` output rows at a time, without autograd."""
    length, kernel = x.shape[1], weight.shape[-1]
    accumulate = _accumulate_dtype(x)
    taps = weight.to(accumulate).t().contiguous()  # (k, channels): taps[k - 1 - lag] multiplies input[t - lag]
    bias = bias.to(accumulate) if bias is not None else None
    previous = previous.to(accumulate) if previous is not None else None

    def rows(start, end, dest):  # the conv for output rows [start, end), into `dest`
        if bias is not None:
            piece = torch.addcmul(bias, x[:, start:end], taps[-1], out=dest)
        else:
            piece = torch.mul(x[:, start:end], taps[-1], out=dest)
        for lag in range(1, kernel):
            first = max(start, lag)  # the first row whose input[t - lag] lies in x
            if end > first:
                inputs = x[:, first - lag:end - lag]
                if seq_idx is not None:  # input t - lag counts only inside t's own sequence
                    inputs = inputs * _same_sequence(seq_idx, lag, first, end)
                piece[:, first - start:].addcmul_(inputs, taps[kernel - 1 - lag])
            if previous is not None and start < lag:  # rows that reach back into the previous inputs
                count, begin = min(lag, end) - start, kernel - 1 - lag + start
                piece[:, :count].addcmul_(previous[:, begin:begin + count], taps[kernel - 1 - lag])
        return F.silu(piece, inplace=True) if silu else piece

    starts = range(0, length, block)
    if inplace:
        scratch = torch.empty(x.shape[0], min(block, length), x.shape[2], dtype=accumulate, device=x.device)
        for start in reversed(starts):  # rows below `start`, which this block reads, are still inputs
            end = min(start + block, length)
            x[:, start:end].copy_(rows(start, end, scratch[:, :end - start]))
        return x
    out = torch.empty(x.shape, dtype=accumulate, device=x.device)
    for start in starts:
        end = min(start + block, length)
        rows(start, end, out[:, start:end])
    return out.to(x.dtype)


def _channel_dots(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """sum over batch and rows of a * b, per channel, for (batch, rows, channels) inputs: ``block`` rows at a time
    into one scratch buffer (a full-size product would be allocated and page-faulted each time: ~5x slower)."""
    out = a.new_zeros(a.shape[-1])
    scratch = a.new_empty(min(block, a.shape[1]), a.shape[-1])
    for row in range(a.shape[0]):
        for start in range(0, a.shape[1], block):
            end = min(start + block, a.shape[1])
            out += torch.mul(a[row, start:end], b[row, start:end], out=scratch[:end - start]).sum(0)
    return out


class _CausalConv1d(torch.autograd.Function):
    """`causal_depthwise_conv1d` with a hand-written backward: it keeps only the input (the pre-activation is
    recomputed), and each gradient is one pass per tap over the rows. Autograd through the tap loop took 0.48 s
    against the forward's 0.06 s (every shifted slice zero-fills a full-size gradient); this backward takes 0.15 s
    (4 x 1,771 tokens x 1,792 channels, 2 threads; benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, previous, silu, seq_idx, block):
        ctx.save_for_backward(x, weight, bias, previous, seq_idx)
        ctx.silu, ctx.block = silu, block
        return _conv_rows(x, weight, bias, previous, silu, seq_idx, block, inplace=False)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, previous, seq_idx = ctx.saved_tensors
        length, kernel = x.shape[1], weight.shape[-1]
        accumulate = _accumulate_dtype(x)
        grad = grad.to(accumulate)
        if ctx.silu:  # through the SiLU, at the recomputed pre-activation
            pre = _conv_rows(x, weight, bias, previous, False, seq_idx, ctx.block, inplace=False).to(accumulate)
            grad = torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=pre)  # over `pre`
        taps = weight.to(accumulate).t()
        x = x.to(accumulate)
        grad_x = grad * taps[-1] if ctx.needs_input_grad[0] else None
        grad_taps = torch.empty_like(taps)
        grad_taps[-1] = _channel_dots(grad, x, ctx.block)
        grad_previous = torch.zeros_like(previous, dtype=accumulate) if previous is not None else None
        for lag in range(1, kernel):
            tap = kernel - 1 - lag
            if length > lag:  # output row t + lag read input row t
                reading = grad[:, lag:]
                if seq_idx is not None:
                    reading = reading * _same_sequence(seq_idx, lag, lag, length)
                if grad_x is not None:
                    grad_x[:, :length - lag].addcmul_(reading, taps[tap])
                grad_taps[tap] = _channel_dots(reading, x[:, :length - lag], ctx.block)
            else:
                grad_taps[tap] = 0
            if previous is not None:  # output rows t < lag read previous[k - 1 - lag + t]
                count = min(lag, length)
                grad_taps[tap] += _channel_dots(grad[:, :count], previous[:, tap:tap + count].to(accumulate), ctx.block)
                grad_previous[:, tap:tap + count].addcmul_(grad[:, :count], taps[tap])
        grad_bias = grad.sum((0, 1)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (grad_x.to(x.dtype) if grad_x is not None else None,
                grad_taps.t().to(weight.dtype) if ctx.needs_input_grad[1] else None, grad_bias,
                grad_previous.to(previous.dtype) if grad_previous is not None and ctx.needs_input_grad[3] else None,
                None, None, None)


def scan_orders(scan: str, num_tokens: int, device=None) -> list[torch.Tensor]:
    """Token orders read by each direction, as index tensors over the patch (row-major) order."""
    forward = torch.arange(num_tokens, device=device)
    if scan == "bidirectional":
        return [forward, forward.flip(0)]
    if scan == "cross":
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"The cross scan needs a square patch grid, got {num_tokens} visual tokens.")
        by_column = forward.view(side, side).t().reshape(-1)
        return [forward, forward.flip(0), by_column, by_column.flip(0)]
    raise ValueError(f"Unknown scan {scan!r}: expected one of {sorted(SCAN_DIRECTIONS)}.")


class ScanDirection(nn.Module):
    """The per-direction SSM parameters: causal conv1d, dt_bias, A_log and D."""

    def __init__(self, conv_dim: int, num_heads: int, conv_kernel: int, use_conv_bias: bool = True):
        super().__init__()
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, padding=conv_kernel - 1,
                                bias=use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))

    @torch.no_grad()
    def reset_ssm_parameters(self, time_step_min=1e-3, time_step_max=0.1, time_step_floor=1e-4, generator=None):
        """Mamba-2's initialisation: A = -[1..heads], D = 1, dt log-uniform in [min, max] stored as softplus^-1."""
        num_heads = self.A_log.numel()
        self.A_log.copy_(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(num_heads, generator=generator) * (math.log(time_step_max) - math.log(time_step_min))
                       + math.log(time_step_min)).clamp(min=time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def causal_conv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv1d + SiLU over (batch, length, channels)."""
        weight = self.conv1d.weight.squeeze(1)
        if causal_conv1d_fn is not None and hidden_states.is_cuda:
            out = causal_conv1d_fn(hidden_states.transpose(1, 2), weight, self.conv1d.bias, activation="silu")
            return out.transpose(1, 2)
        length = hidden_states.shape[1]
        out = self.conv1d(hidden_states.transpose(1, 2))[..., :length]
        return F.silu(out).transpose(1, 2)


class MultiScanMamba2Mixer(nn.Module):
    """A Mamba-2 mixer that scans a token grid in 2 (BSM) or 4 (CSM) directions and averages them."""

    def __init__(self, hidden_size: int, scan: str = "bidirectional", state_size: int = 128, head_dim: int = 64,
                 expand: int = 2, n_groups: int = 1, conv_kernel: int = 4, chunk_size: int = 256,
                 layer_norm_epsilon: float = 1e-5, use_bias: bool = False, use_conv_bias: bool = True,
                 time_step_limit=(0.0, float("inf"))):
        super().__init__()
        if scan not in SCAN_DIRECTIONS:
            raise ValueError(f"Unknown connector scan {scan!r}: expected one of {sorted(SCAN_DIRECTIONS)}.")
        self.scan = scan
        self.intermediate_size = expand * hidden_size
        if self.intermediate_size % head_dim:
            raise ValueError(f"expand * hidden_size ({self.intermediate_size}) must be a multiple of head_dim "
                             f"({head_dim}) in the connector's Mamba-2 mixer.")
        self.num_heads = self.intermediate_size // head_dim
        if self.num_heads % n_groups:
            raise ValueError(f"The number of heads ({self.num_heads}) must be a multiple of n_groups ({n_groups}).")
        self.head_dim, self.n_groups, self.state_size = head_dim, n_groups, state_size
        self.chunk_size = chunk_size
        self.time_step_limit = tuple(time_step_limit)
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size

        # Order of the projection: [z (gate), x, B, C, dt], as in mamba_ssm and transformers
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=use_bias)
        self.directions = nn.ModuleList(
            ScanDirection(self.conv_dim, self.num_heads, conv_kernel, use_conv_bias)
            for _ in range(SCAN_DIRECTIONS[scan])
        )
        self.norm = GatedRMSNorm(self.intermediate_size, group_size=self.intermediate_size // n_groups,
                                eps=layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=use_bias)

    def scan_direction(self, direction: ScanDirection, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Conv + SSD scan of one direction's token order. xbc (b, l, conv_dim), dt (b, l, heads) -> (b, l, d_inner)."""
        batch, length, _ = xbc.shape
        xbc = direction.causal_conv(xbc)
        x, B, C = xbc.split([self.intermediate_size, self.n_groups * self.state_size,
                             self.n_groups * self.state_size], dim=-1)
        y = ssd_scan(
            x.reshape(batch, length, self.num_heads, self.head_dim), dt, -torch.exp(direction.A_log.float()),
            B.reshape(batch, length, self.n_groups, self.state_size),
            C.reshape(batch, length, self.n_groups, self.state_size),
            self.chunk_size, D=direction.D, dt_bias=direction.dt_bias, dt_softplus=True,
            dt_limit=self.time_step_limit,
        )
        return y.reshape(batch, length, self.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (batch, tokens, hidden) in patch order -> same shape.

        All directions run as one conv and one SSD scan: direction d's tokens, read in its own order, become heads
        ``[d * heads, (d + 1) * heads)`` (and B/C groups ``[d * groups, (d + 1) * groups)``) of a single scan, which
        is the same computation as `scan_direction` per direction, with a fraction of the kernel launches.
        """
        batch, length, _ = hidden_states.shape
        num_directions = len(self.directions)
        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        orders = torch.stack(scan_orders(self.scan, length, hidden_states.device), dim=1)  # (l, directions)
        xbc = xbc[:, orders]  # (b, l, directions, conv_dim): step t of direction d reads token orders[t, d]
        dt = dt[:, orders].reshape(batch, length, num_directions * self.num_heads)

        weight = torch.cat([d.conv1d.weight[:, 0] for d in self.directions])  # (directions * conv_dim, k)
        bias = torch.cat([d.conv1d.bias for d in self.directions]) if self.directions[0].conv1d.bias is not None else None
        xbc = xbc.reshape(batch, length, num_directions * self.conv_dim)
        if causal_conv1d_fn is not None and xbc.is_cuda:
            xbc = causal_conv1d_fn(xbc.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
        else:
            xbc = causal_depthwise_conv1d(xbc, weight, bias, silu=True)
        xbc = xbc.reshape(batch, length, num_directions, self.conv_dim)
        x, B, C = xbc.split([self.intermediate_size, self.n_groups * self.state_size,
                             self.n_groups * self.state_size], dim=-1)

        def stacked(name):  # the directions' per-head parameters, in head order
            return torch.cat([getattr(d, name) for d in self.directions])

        y = ssd_scan(
            x.reshape(batch, length, num_directions * self.num_heads, self.head_dim), dt,
            -torch.exp(stacked("A_log").float()),
            B.reshape(batch, length, num_directions * self.n_groups, self.state_size),
            C.reshape(batch, length, num_directions * self.n_groups, self.state_size),
            self.chunk_size, D=stacked("D"), dt_bias=stacked("dt_bias"), dt_softplus=True,
            dt_limit=self.time_step_limit,
        ).reshape(batch, length, num_directions, self.intermediate_size)
        # Back to patch order: token orders[t, d] is direction d's output at step t.
        restore = torch.argsort(orders, dim=0)  # (l, directions)
        y = y.gather(1, restore[None, :, :, None].expand_as(y))
        merged = self.norm(y, gate[:, :, None]).mean(dim=2)  # shared gated norm per direction, then the average
        return self.out_proj(merged.to(self.out_proj.weight.dtype))
