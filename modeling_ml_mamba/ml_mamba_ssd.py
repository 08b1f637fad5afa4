"""Mamba-2 state space duality (SSD): the scan every ML-Mamba connector runs.

Three implementations behind one signature, chosen in one place (`ssd_scan`):

* ``mamba_chunk_scan_combined`` from mamba-ssm (Triton) when it is installed and the tensors are on CUDA;
* ``ssd_chunked``: a pure-PyTorch chunked SSD (the algorithm of the Mamba-2 paper, listing 1), for CPU and for
  machines without mamba-ssm;
* ``ssd_sequential``: the plain recurrence, one token at a time. It is slow and exists as the oracle the two fast
  paths are tested against.

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


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


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


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, float("inf")), initial_state=None, return_final_state=False):
    """Chunked SSD in PyTorch: quadratic attention-like form inside chunks, a recurrence across chunk states.

    Works in float32 whatever the input dtype, like the Triton kernel. Heads that share a group of B/C are kept
    grouped (no ``repeat_interleave`` of B and C to every head), which saves memory and time on CPU.
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    heads_per_group = heads // groups
    out_dtype = x.dtype

    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, l, h)
    x_dt = x.float() * dt[..., None]  # discretised input, (b, l, h, p)
    A_dt = dt * A.float()  # (b, l, h), log of the per-step decay

    pad = (-length) % chunk_size
    if pad:
        x_dt = F.pad(x_dt, (0, 0, 0, 0, 0, pad))
        A_dt = F.pad(A_dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    q = chunk_size

    # (b, c, q, g, r, p) with r = heads per group; B and C (b, c, q, g, n)
    x_dt = x_dt.view(batch, chunks, q, groups, heads_per_group, head_dim)
    B = B.float().view(batch, chunks, q, groups, state_size)
    C = C.float().view(batch, chunks, q, groups, state_size)
    A_cumsum = A_dt.view(batch, chunks, q, groups, heads_per_group).cumsum(dim=2)  # (b, c, q, g, r)

    # 1. Inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) x_s
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, q, q)
    cum = A_cumsum.permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    segment = cum[..., :, None] - cum[..., None, :]  # (b, c, g, r, q_l, q_s)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(segment.masked_fill(~causal, float("-inf")))
    weights = scores[:, :, :, None] * decay  # (b, c, g, r, q, q)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", weights, x_dt)

    # 2. The state each chunk leaves behind, as if it had started from zero
    decay_to_end = torch.exp(cum[..., -1:] - cum)  # (b, c, g, r, q)
    chunk_states = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", B, decay_to_end, x_dt)

    # 3. Carry states across chunks (a short sequential loop over chunks: c = l / chunk_size)
    chunk_decay = torch.exp(cum[..., -1])  # (b, c, g, r)
    if initial_state is not None:
        state = initial_state.float().view(batch, groups, heads_per_group, head_dim, state_size)
    else:
        state = x_dt.new_zeros(batch, groups, heads_per_group, head_dim, state_size)
    start_states = []
    for c in range(chunks):
        start_states.append(state)
        state = state * chunk_decay[:, c, ..., None, None] + chunk_states[:, c]
    start_states = torch.stack(start_states, dim=1)  # (b, c, g, r, p, n)

    # 4. Contribution of the state a chunk starts from
    y = y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C, start_states, torch.exp(cum))

    y = y.reshape(batch, chunks * q, heads, head_dim)[:, :length]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    y = y.to(out_dtype)
    if return_final_state:
        return y, state.reshape(batch, heads, head_dim, state_size)
    return y


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, float("inf")),
             initial_state=None, return_final_state=False):
    """The scan used by every connector: the Triton kernel on CUDA when mamba-ssm is installed, else PyTorch."""
    if mamba_chunk_scan_combined is not None and x.is_cuda:
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_state,
        )
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                       dt_limit=dt_limit, initial_state=initial_state, return_final_state=return_final_state)
