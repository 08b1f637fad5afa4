"""Where to plug our CPU fast path into transformers' Mamba-2 LM: the mixer's class (what we ship) or 5.25's
kernelizable functions (``causal_conv1d_forward`` + ``mamba2_scan_forward``, what ``kernels.kernelize`` replaces).

    python benchmarks/bench_plugin_vs_swap.py            # transformers >= 5.25

Three arms on the same weights (one Mamba-2 mixer at the benchmark LM's shapes, 768 hidden, 24 heads x 64, state
128), measured in turn in one run (medians): transformers' reference path; the *function plug-in*, i.e. transformers'
own `Mamba2Mixer.forward` with our conv and SSD scan in place of its two kernelizable functions (set here as the
module's functions, which is the replacement `kernelize` makes, without building a kernel repository); and the
*class swap* (`FastMamba2Mixer`). The plug-in cannot reach what lies between the functions: the projection and the
gated norm run transformers' way (out of place, conv input transposed to channels-first and back), and prefill
cannot be cut into segments, so its memory grows with the prompt.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from transformers import DynamicCache, Mamba2Config

from modeling_ml_mamba.ml_mamba_compat import Mamba2Mixer
from modeling_ml_mamba.ml_mamba_fast_mamba2 import enable_fast_mamba2
from modeling_ml_mamba.ml_mamba_scan import causal_depthwise_conv1d
from modeling_ml_mamba.ml_mamba_ssd import CPU_CHUNK_SIZE, ssd_chunked, ssd_step

HEADS, HEAD_DIM, STATE, HIDDEN = 24, 64, 128, 768


def conv_plugin(conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
    """`causal_conv1d_forward` with our conv: (batch, channels, length) in and out, conv state kept in ``cache``."""
    kernel = conv1d.kernel_size[0]
    conv_state = cache.get_conv_state(layer_idx) if cache is not None else None
    silu = activation in ("silu", "swish")
    if conv_state is not None and hidden_states.shape[-1] == 1:  # decode: shift the window in place
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], hidden_states], dim=-1))
        cache.increase_count(layer_idx, state_idx)
        out = (conv_state * conv1d.weight[:, 0]).sum(-1, keepdim=True)
        out = out + conv1d.bias[:, None] if conv1d.bias is not None else out
        return torch.nn.functional.silu(out) if silu else out
    previous = conv_state[:, :, 1:].transpose(1, 2) if conv_state is not None else None
    x = hidden_states.transpose(1, 2)
    if cache is not None:
        cache.update_conv_state(hidden_states, layer_idx, conv_kernel_size=kernel)
    out = causal_depthwise_conv1d(x.contiguous(), conv1d.weight[:, 0], conv1d.bias, previous, silu=silu)
    return out.transpose(1, 2)


def scan_plugin(module, hidden_states, B, C, dt, cache, **kwargs):
    """`mamba2_scan_forward` with our SSD: a step in place at decode, the chunked scan otherwise."""
    batch, length, _ = hidden_states.shape
    state = cache.get_recurrent_state(module.layer_idx) if cache is not None else None
    A = -torch.exp(module.A_log.float())
    if state is not None and length == 1:
        y, new_state = ssd_step(state, hidden_states.view(batch, module.num_heads, module.head_dim), dt[:, 0], A,
                                B.view(batch, module.n_groups, -1), C.view(batch, module.n_groups, -1), D=module.D,
                                dt_bias=module.dt_bias, dt_softplus=True, dt_limit=module.time_step_limit)
        if new_state is not state:
            cache.update_recurrent_state(new_state, module.layer_idx)
        return y.view(batch, 1, -1)
    y, final = ssd_chunked(hidden_states.view(batch, length, module.num_heads, module.head_dim), dt, A,
                           B.view(batch, length, module.n_groups, -1), C.view(batch, length, module.n_groups, -1),
                           CPU_CHUNK_SIZE, D=module.D, dt_bias=module.dt_bias, dt_softplus=True,
                           dt_limit=module.time_step_limit, initial_state=state, return_final_state=True)
    if cache is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return y.reshape(batch, length, -1)


class plugged_in:
    """Context: transformers' mixer module calls our two functions instead of its own."""

    def __enter__(self):
        self.module = __import__(Mamba2Mixer.__module__, fromlist=["_"])
        self.saved = self.module.causal_conv1d_forward, self.module.mamba2_scan_forward
        self.module.causal_conv1d_forward, self.module.mamba2_scan_forward = conv_plugin, scan_plugin

    def __exit__(self, *exc):
        self.module.causal_conv1d_forward, self.module.mamba2_scan_forward = self.saved


def measure(prefill_tokens: int, batch: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    config = Mamba2Config(hidden_size=HIDDEN, num_hidden_layers=1, num_heads=HEADS, head_dim=HEAD_DIM,
                          state_size=STATE, n_groups=1, expand=2, chunk_size=256, vocab_size=64)
    reference = Mamba2Mixer(config, layer_idx=0).eval()
    fast = copy.deepcopy(reference)
    enable_fast_mamba2(fast)
    prompt = torch.randn(batch, prefill_tokens, HIDDEN)
    tokens = torch.randn(steps, batch, 1, HIDDEN)
    arms = {"transformers": (reference, None), "function plug-in": (reference, plugged_in), "class swap": (fast, None)}

    def run(arm):
        mixer, context = arms[arm]
        with torch.no_grad(), (context() if context else _null()):
            cache = DynamicCache(config=config)
            start = time.perf_counter()
            out = mixer(prompt, cache=cache)
            middle = time.perf_counter()
            outs = [mixer(token, cache=cache) for token in tokens]
            end = time.perf_counter()
        return middle - start, (end - middle) / steps, torch.cat([out[:, -1:], *outs], 1)

    results = {arm: {"prefill": [], "decode": []} for arm in arms}
    outputs = {}
    for arm in arms:  # warm-up
        outputs[arm] = run(arm)[2]
    for _ in range(repeats):
        for arm in arms:
            prefill, decode, _ = run(arm)
            results[arm]["prefill"].append(prefill)
            results[arm]["decode"].append(decode)
    scale = outputs["transformers"].abs().max()
    return {arm: {"prefill_ms": 1e3 * sorted(r["prefill"])[len(r["prefill"]) // 2],
                  "decode_ms": 1e3 * sorted(r["decode"])[len(r["decode"]) // 2],
                  "max_rel_diff": float((outputs[arm] - outputs["transformers"]).abs().max() / scale)}
            for arm, r in results.items()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import transformers

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load {open('/proc/loadavg').read().split()[:3]}")
    print("| prompt | batch | arm | prefill ms | decode ms/step | vs transformers (prefill, decode) | max rel diff |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for tokens in args.prefill:
        for batch in args.batches:
            rows = measure(tokens, batch, args.steps, args.repeats)
            base = rows["transformers"]
            for arm, row in rows.items():
                print(f"| {tokens} | {batch} | {arm} | {row['prefill_ms']:.1f} | {row['decode_ms']:.2f} | "
                      f"{base['prefill_ms'] / row['prefill_ms']:.2f}x, {base['decode_ms'] / row['decode_ms']:.2f}x | "
                      f"{row['max_rel_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
