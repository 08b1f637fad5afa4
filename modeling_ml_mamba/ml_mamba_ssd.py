"""Mamba-2 state space duality (SSD): the scan every ML-Mamba connector and the CPU fast path of the LM run.

Implementations behind one signature, chosen in one place (`ssd_scan`):

* ``mamba_chunk_scan_combined`` from mamba-ssm (Triton) when it is installed and the tensors are on CUDA;
* ``ssd_chunked``: a pure-PyTorch chunked SSD (the algorithm of the Mamba-2 paper, listing 1), written for CPUs
  and machines without mamba-ssm;
* ``ssd_sequential``: the plain recurrence, one token at a time. It is slow and exists as the oracle the fast
  paths are tested against.

``ssd_step`` is the single-token recurrence used for decoding (the role of mamba-ssm's ``selective_state_update``).

Shapes (b = batch, l = length, h = heads, p = head_dim, g = groups, n = state size):
    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,), state (b, h, p, n).
``dt`` is the raw projection: ``dt_bias`` is added, then softplus (``dt_softplus``), then the clamp to ``dt_limit``,
exactly as mamba-ssm's kernel does it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the GPU fast path; an optional extra (`pip install ml-mamba[cuda]`)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:  # ImportError, or a broken CUDA build that fails at import
    mamba_chunk_scan_combined = None

# Decay factors exp(a) with a < -60 (below 1e-26) are computed as exp(-60): their contribution is far below float32
# resolution, and it keeps CPUs out of the denormal range (exp(-88)..exp(-103)), where arithmetic is ~10x slower.
LOG_DECAY_FLOOR = -60.0
# `ssd_chunked` works through long sequences in segments of about this many tokens, carrying the state between
# them: intermediates stay a few MB (cache-friendly, no page faults) and peak memory grows only with the output.
SEGMENT_TOKENS = 1024
# Chunk length `ssd_scan` uses on CPU, whatever the model's chunk_size: the result does not depend on it (up to
# float32 rounding), and 64 balanced the quadratic intra-chunk work against the per-chunk state work best on the
# benchmark machine (benchmarks/RESULTS.md). GPUs keep the configured chunk size.
CPU_CHUNK_SIZE = 64


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether an op over ``tensors`` (None allowed) records autograd: grad mode is on and one of them requires grad
    (the scan, conv and norm then take their differentiable path instead of the in-place one)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_shapes(x, dt, B, C):
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"dt must have shape (batch, length, heads) = {(batch, length, heads)}, got {tuple(dt.shape)}.")
    if B.shape != C.shape or B.shape[:2] != (batch, length):
        raise ValueError(f"B and C must both have shape (batch, length, groups, state) with batch, length = "
                         f"{(batch, length)}; got B {tuple(B.shape)} and C {tuple(C.shape)}.")
    if heads % B.shape[2]:
        raise ValueError(f"The number of heads ({heads}) must be a multiple of the number of B/C groups ({B.shape[2]}).")


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                   initial_state=None, return_final_state=False):
    """Reference recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t h_t + D x_t (float32)."""
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
    B = B.float().repeat_interleave(heads // groups, dim=2)  # (b, l, h, n)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    state = (initial_state.float().clone() if initial_state is not None
             else x.new_zeros(batch, heads, head_dim, state_size, dtype=torch.float32))
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A.float())  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def equal_part_length(length: int, most: int) -> int:
    """The length of the parts when ``length`` tokens are split into as few parts of at most ``most`` as possible,
    all of one length (the last may be shorter by less than one per part): 82 at most 64 -> 41, not 64 + 18."""
    return -(-length // -(-length // most))


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b).float()


def _ssd_segment(x_dt, A_dt, B, C, chunk_size, state, track_grad, seq=None, state_seq=None):
    """Chunked SSD over one segment of one B/C group, all float32, without the D skip.

    x_dt (b, l, h, p) = dt * x, A_dt (b, l, h) = dt * A, B and C (b, l, n) shared by the h heads, state (b, n, h*p)
    or None. The state is kept transposed, (n, h*p), so that both state matmuls read x and write y in their natural
    (token, head, head_dim) layout without copies. Returns y (b, l, h, p) and the state after the segment.

    ``seq`` (b, l), optional: the sequence each token belongs to (packed sequences, non-decreasing); no state flows
    from one sequence into the next. ``state_seq`` (b,) is the sequence the incoming ``state`` belongs to.
    """
    batch, length, heads, head_dim = x_dt.shape
    state_size = B.shape[-1]
    # As many chunks as chunk_size needs, of equal length: padding stays below one token per chunk (82 tokens at
    # chunk_size 64: 2 chunks of 41, not 2 of 64), and the quadratic in-chunk work shrinks with it.
    q = equal_part_length(length, chunk_size)
    c = -(-length // q)
    pad = c * q - length
    if pad:
        x_dt = F.pad(x_dt, (0, 0, 0, 0, 0, pad))
        A_dt = F.pad(A_dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))
        if seq is not None:  # padding belongs to the last sequence (it adds nothing: x_dt = 0, decay 1)
            seq = torch.cat([seq, seq[:, -1:].expand(-1, pad)], dim=1)
    x_dt = x_dt.view(batch, c, q, heads, head_dim)
    B = B.view(batch, c, q, state_size)
    C = C.view(batch, c, q, state_size)
    cum = A_dt.view(batch, c, q, heads).cumsum(2)  # (b, c, q, h): log decay since the chunk start
    cum_h = cum.transpose(2, 3).contiguous()  # (b, c, h, q); contiguous so that `decay` below is, too

    # 1. Inside each chunk (attention-like): y_l = sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) x_s.
    #    cum is non-increasing, so clamping at 0 only touches s > l, which the causal mask on the scores zeroes.
    scores = torch.matmul(C, B.transpose(-1, -2)).tril_()[:, :, None]  # (b, c, 1, q_l, q_s)
    decay = torch.sub(cum_h[..., :, None], cum_h[..., None, :])  # (b, c, h, q_l, q_s)
    if seq is not None:  # no weight between tokens of different sequences
        seq = seq.view(batch, c, q)
        scores = scores * _same(seq[:, :, None, :, None], seq[:, :, None, None, :])
    if track_grad:
        weights = decay.clamp(LOG_DECAY_FLOOR, 0.0).exp() * scores
    else:  # the same, without allocating (these are the largest tensors of the scan)
        weights = decay.clamp_(LOG_DECAY_FLOOR, 0.0).exp_().mul_(scores)
    y_diag = torch.matmul(weights, x_dt.transpose(2, 3))  # (b, c, h, q, p)
    del scores, decay, weights

    # 2. The state each chunk leaves behind (started from zero), transposed: (b, c, n, h*p)
    decay_to_end = (cum[:, :, -1:] - cum).clamp(min=LOG_DECAY_FLOOR).exp()  # (b, c, q, h)
    if seq is not None:  # only the sequence a chunk ends in leaves a state behind
        decay_to_end = decay_to_end * _same(seq, seq[:, :, -1:])[..., None]
    x_decayed = (x_dt * decay_to_end[..., None]).view(batch, c, q, heads * head_dim)
    chunk_states = torch.matmul(B.transpose(-1, -2), x_decayed).view(batch, c, state_size, heads, head_dim)
    del x_decayed

    # 3. Carry the state across chunks: a short loop over c = l / q chunks.
    chunk_decay = cum[:, :, -1].clamp(min=LOG_DECAY_FLOOR).exp().view(batch, c, 1, heads, 1)
    if seq is not None:  # the state entering chunk i belongs to the sequence chunk i - 1 ended in
        entering = torch.cat([(state_seq if state_seq is not None else seq[:, 0, 0])[:, None], seq[:, :-1, -1]], 1)
        chunk_decay = chunk_decay * _same(entering, seq[:, :, -1]).view(batch, c, 1, 1, 1)
    if track_grad:
        start = (state.view(batch, state_size, heads, head_dim) if state is not None
                 else x_dt.new_zeros(batch, state_size, heads, head_dim))
        starts = [start]
        # unbind once: indexing [:, i] in the loop would make autograd zero-fill and add a full-size gradient per
        # chunk (c^2 memory traffic in backward)
        for decay_i, states_i in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
            starts.append(starts[-1] * decay_i + states_i)
        final = starts.pop()  # kept apart, so that no slice of a stacked tensor zero-fills a gradient in backward
        starts = torch.stack(starts, dim=1)  # (b, c, n, h, p)
    else:  # in place into one buffer
        starts = x_dt.new_empty(batch, c + 1, state_size, heads, head_dim)
        if state is None:
            starts[:, 0].zero_()
        else:
            starts[:, 0].copy_(state.view(batch, state_size, heads, head_dim))
        for i in range(c):
            torch.addcmul(chunk_states[:, i], starts[:, i], chunk_decay[:, i], out=starts[:, i + 1])
        starts, final = starts[:, :c], starts[:, c]
    starts = starts.flatten(-2)  # (b, c, n, h * p)

    # 4. What the state a chunk starts from contributes: y_l += exp(cum_l) C_l . state
    y = torch.matmul(C, starts).view(batch, c, q, heads, head_dim)
    decay_from_start = cum.clamp(min=LOG_DECAY_FLOOR).exp()[..., None]  # (b, c, q, h, 1)
    if seq is not None:  # ... to the tokens of the sequence it belongs to only
        decay_from_start = decay_from_start * _same(seq, entering[:, :, None])[..., None, None]
    if track_grad:
        y = torch.addcmul(y_diag.transpose(2, 3), y, decay_from_start)
    else:
        y = torch.addcmul(y_diag.transpose(2, 3), y, decay_from_start, out=y)
    y = y.reshape(batch, c * q, heads, head_dim)
    return (y[:, :length] if pad else y), final.flatten(-2)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False, seq_idx=None):
    """Chunked SSD in PyTorch: quadratic attention-like form inside chunks, a recurrence across chunk states.

    Works in float32 whatever the input dtype, like the Triton kernel. Written for CPUs: B/C groups become batch
    entries (heads are never expanded over groups), every contraction is one batched matmul over contiguous memory,
    the chunk recurrence is linear in the number of chunks, decays are floored out of the denormal range, and long
    inputs are processed in segments of ``SEGMENT_TOKENS`` (bounded intermediates). Differentiable (the connectors
    train through it). ``seq_idx`` (b, l), non-decreasing: packed sequences, the state reset at each boundary (as
    mamba-ssm's kernel takes it; ``initial_state`` belongs to the first sequence).
    """
    _check_shapes(x, dt, B, C)
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    r = heads // groups  # heads per group
    if length == 0:
        raise ValueError("ssd_chunked needs at least one token (x has length 0).")
    track_grad = needs_autograd(x, dt, A, B, C, D, dt_bias, initial_state)
    A = A.float()
    chunk_size = max(1, min(int(chunk_size), length))
    segment = chunk_size * max(1, SEGMENT_TOKENS // chunk_size)

    def by_group(t, *inner):  # (b, l, g, *inner) -> (b * g, l, *inner): groups are independent scans
        t = t.reshape(batch, t.shape[1], groups, *inner)
        return t.squeeze(2) if groups == 1 else t.transpose(1, 2).reshape(batch * groups, t.shape[1], *inner)

    state = None  # (b * g, n, r * p)
    if initial_state is not None:
        state = initial_state.float().reshape(batch * groups, r, head_dim, state_size).permute(0, 3, 1, 2)
        state = state.reshape(batch * groups, state_size, r * head_dim)
    outputs, state_seq = [], None
    if seq_idx is not None:
        seq_idx = seq_idx.to(device=x.device).expand(batch, length)
        seq_idx = seq_idx.repeat_interleave(groups, dim=0) if groups > 1 else seq_idx  # (b * g, l)
    for start in range(0, length, segment):
        end = min(start + segment, length)
        seg_dt = _discretize_dt(dt[:, start:end], dt_bias, dt_softplus, dt_limit)  # (b, s, h)
        seg_x = x[:, start:end].float()
        seg_seq = seq_idx[:, start:end] if seq_idx is not None else None
        y, state = _ssd_segment(by_group(seg_x * seg_dt[..., None], r, head_dim), by_group(seg_dt * A, r),
                                by_group(B[:, start:end].float(), state_size),
                                by_group(C[:, start:end].float(), state_size), chunk_size, state, track_grad,
                                seg_seq, state_seq)
        state_seq = seg_seq[:, -1] if seg_seq is not None else None
        if groups > 1:  # (b * g, s, r, p) -> (b, s, h, p)
            y = y.view(batch, groups, end - start, r, head_dim).transpose(1, 2)
        y = y.reshape(batch, end - start, heads, head_dim)
        if D is not None:
            y = torch.addcmul(y, seg_x, D.float()[:, None]) if track_grad else y.addcmul_(seg_x, D.float()[:, None])
        outputs.append(y.to(x.dtype))
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if return_final_state:  # (b * g, n, r * p) -> (b, h, p, n)
        final_state = state.view(batch * groups, state_size, r, head_dim).permute(0, 2, 3, 1)
        return y, final_state.reshape(batch, heads, head_dim, state_size)
    return y


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """One recurrence step for decoding: returns ``(y, new_state)``.

    state (b, h, p, n), x (b, h, p), dt (b, h), B and C (b, g, n) -> y (b, h, p) in x's dtype. The same arithmetic as
    ``ssd_sequential``. Without autograd and with a float32 state, ``state`` is updated in place and returned as
    ``new_state`` (no allocation per step); otherwise ``new_state`` is a new float32 tensor.
    """
    batch, heads, head_dim = x.shape
    groups, state_size = B.shape[1], B.shape[2]
    r = heads // groups
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, h)
    decay = (dt * A.float()).clamp(min=LOG_DECAY_FLOOR).exp().view(batch, groups, r, 1, 1)
    x_dt = (x.float() * dt[..., None]).view(batch, groups, r, head_dim, 1)
    B = B.float().view(batch, groups, 1, 1, state_size)
    C = C.float().reshape(batch * groups, state_size, 1)
    grouped = state.view(batch, groups, r, head_dim, state_size)
    tracked = needs_autograd(state, x_dt, decay, B, C)
    if state.dtype == torch.float32 and not tracked:
        new_state = grouped.mul_(decay).addcmul_(x_dt, B)
    else:
        new_state = grouped.float() * decay + x_dt * B
    # y = state . C per group: one matrix-vector product per (batch, group), (r*p, n) @ (n,)
    y = torch.bmm(new_state.reshape(batch * groups, r * head_dim, state_size), C).view(batch, heads, head_dim)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), new_state.view(batch, heads, head_dim, state_size)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")),
             initial_state=None, return_final_state=False):
    """The scan used by every connector: the Triton kernel on CUDA when mamba-ssm is installed, else PyTorch."""
    if mamba_chunk_scan_combined is not None and x.is_cuda:
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_state,
        )
    if x.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK_SIZE)
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                       dt_limit=dt_limit, initial_state=initial_state, return_final_state=return_final_state)
