"""The fast CPU path is numerically the same model: chunked SSD and decode step vs the plain recurrence, the fused
multi-direction scan connector vs one direction at a time, and `FastMamba2Mixer` vs transformers' own Mamba-2
path on the same weights (forward, segmented prefill, cache, decode, generate, left padding, gradients, save/load).

Runtime budget: under 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText, Mamba2Config, Mamba2ForCausalLM
from utils import digit_images, tiny_config, tiny_model

import modeling_ml_mamba.ml_mamba_ssd as ssd_module
from modeling_ml_mamba import MLMambaForConditionalGeneration
from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME, Mamba2Mixer, mamba2_chunk_scan
from modeling_ml_mamba.ml_mamba_fast_mamba2 import FastMamba2Mixer, enable_fast_mamba2
from modeling_ml_mamba.ml_mamba_norm import gated_rms_norm
from modeling_ml_mamba.ml_mamba_scan import MultiScanMamba2Mixer, causal_depthwise_conv1d
from modeling_ml_mamba.ml_mamba_ssd import ssd_chunked, ssd_sequential, ssd_step


def _ssm_inputs(batch=2, length=70, heads=8, head_dim=4, groups=2, state=8, strong_decay=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    A = -torch.arange(1, heads + 1, dtype=torch.float32) * (8.0 if strong_decay else 1.0)
    return dict(x=randn(batch, length, heads, head_dim), dt=randn(batch, length, heads), A=A,
                B=randn(batch, length, groups, state), C=randn(batch, length, groups, state), D=randn(heads),
                dt_bias=randn(heads) - 2)


@pytest.mark.parametrize("chunk_size, segment, groups", [(16, 1024, 1), (16, 32, 2), (7, 20, 4), (128, 1024, 2)])
def test_chunked_ssd_equals_the_recurrence_with_segments_groups_and_initial_state(chunk_size, segment, groups,
                                                                                   monkeypatch):
    monkeypatch.setattr(ssd_module, "SEGMENT_TOKENS", segment)
    inputs = _ssm_inputs(groups=groups)
    initial = torch.randn(2, 8, 4, 8)
    expected, expected_state = ssd_sequential(**inputs, dt_softplus=True, initial_state=initial,
                                              return_final_state=True)
    got, state = ssd_chunked(**inputs, chunk_size=chunk_size, dt_softplus=True, initial_state=initial,
                             return_final_state=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(state, expected_state, atol=2e-5, rtol=1e-4)


def test_decays_are_floored_without_changing_results():
    """Strongly decaying heads drive exp() into the denormal range; the floor must not change the output."""
    inputs = _ssm_inputs(strong_decay=True, length=200)
    inputs["dt_bias"] = inputs["dt_bias"] + 4  # dt ~ 2-4: per-step decays down to exp(-100)
    expected = ssd_sequential(**inputs, dt_softplus=True)
    torch.testing.assert_close(ssd_chunked(**inputs, chunk_size=64, dt_softplus=True), expected, atol=2e-5, rtol=1e-4)
    theirs = mamba2_chunk_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=64,
                               D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(theirs, expected, atol=2e-5, rtol=1e-4)


def test_chunked_ssd_gradients_equal_the_recurrence(monkeypatch):
    monkeypatch.setattr(ssd_module, "SEGMENT_TOKENS", 24)
    inputs = _ssm_inputs(length=50)
    initial = torch.randn(2, 8, 4, 8)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]

    def grads(function, **extra):
        leaves = {name: inputs[name].clone().requires_grad_() for name in names}
        state0 = initial.clone().requires_grad_()
        y, state = function(**{**inputs, **leaves}, dt_softplus=True, initial_state=state0, return_final_state=True,
                            **extra)
        (y.square().sum() + state.sin().sum()).backward()
        return [leaves[name].grad for name in names] + [state0.grad]

    for ours, reference in zip(grads(ssd_chunked, chunk_size=8), grads(ssd_sequential)):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_chunked_ssd_keeps_a_low_precision_dtype():
    inputs = _ssm_inputs(length=40)
    inputs["x"] = inputs["x"].to(torch.bfloat16)
    got = ssd_chunked(**inputs, chunk_size=16, dt_softplus=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ssd_sequential(**inputs, dt_softplus=True).float(), atol=0.05, rtol=0.02)


def test_decode_step_equals_the_recurrence_and_updates_the_state_in_place():
    inputs = _ssm_inputs(length=30)
    initial = torch.randn(2, 8, 4, 8)
    expected, expected_state = ssd_sequential(**inputs, dt_softplus=True, initial_state=initial,
                                              return_final_state=True)
    state = initial.clone()
    outputs = []
    for t in range(30):
        y, new_state = ssd_step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                                inputs["C"][:, t], D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
        assert new_state.data_ptr() == state.data_ptr()  # no allocation of a new state per token
        outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, 1), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-4)


def test_causal_conv_equals_conv1d_with_and_without_previous_inputs():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 11, 6)
    expected = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv1d(x, conv.weight[:, 0], conv.bias), expected)
    second = causal_depthwise_conv1d(x[:, 5:], conv.weight[:, 0], conv.bias, previous=x[:, 2:5])
    torch.testing.assert_close(second, expected[:, 5:])


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("inputs", ["plain", "previous", "packed"])
def test_causal_conv_backward_matches_numerical_gradients(silu, inputs):
    """The hand-written backward of the conv (`_CausalConv1d`) against finite differences, in float64, for the
    input, the taps, the bias and the previous inputs; `block` 3 makes the forward's row blocks show."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) if inputs == "previous" else None
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2, 2]]) if inputs == "packed" else None

    def conv(x, weight, bias, *previous):
        return causal_depthwise_conv1d(x, weight, bias, previous[0] if previous else None, silu=silu, block=3,
                                       seq_idx=seq_idx)

    tensors = (x, weight, bias) + ((previous,) if previous is not None else ())
    assert torch.autograd.gradcheck(conv, tensors)


@pytest.mark.parametrize("with_gate", [True, False])
def test_gated_rms_norm_forward_and_hand_written_backward(with_gate):
    """`gated_rms_norm` (the LM's and the connectors' gated norm) equals the reference ops, and its backward
    matches finite differences in float64 for the input, the gate and the weight."""
    torch.manual_seed(0)
    y = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) if with_gate else None
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    gated = y * torch.nn.functional.silu(gate) if with_gate else y
    grouped = gated.unflatten(-1, (2, 4))
    expected = weight * (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2)
    torch.testing.assert_close(gated_rms_norm(y, gate, weight, 4, 1e-6), expected)
    tensors = (y, weight) + ((gate,) if with_gate else ())
    assert torch.autograd.gradcheck(lambda y, weight, *gate: gated_rms_norm(y, gate[0] if gate else None, weight,
                                                                            4, 1e-6), tensors)
    half = gated_rms_norm(y.detach().bfloat16(), None if gate is None else gate.detach().bfloat16(),
                          weight.detach().bfloat16(), 4, 1e-6)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_fused_scan_connector_equals_one_direction_at_a_time(scan):
    """The connector runs its 2 or 4 directions as one scan; `scan_direction` is the per-direction definition."""
    torch.manual_seed(0)
    mixer = MultiScanMamba2Mixer(32, scan=scan, state_size=8, head_dim=8, chunk_size=4, n_groups=2)
    for direction in mixer.directions:
        direction.reset_ssm_parameters()
        direction.D.data.normal_()
        direction.conv1d.weight.data.normal_()
        direction.A_log.data += torch.rand_like(direction.A_log)
    hidden = torch.randn(2, 16, 32, requires_grad=True)

    def per_direction(hidden_states):
        from modeling_ml_mamba.ml_mamba_scan import scan_orders

        gate, xbc, dt = mixer.in_proj(hidden_states).split(
            [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
        merged = 0
        for direction, order in zip(mixer.directions, scan_orders(scan, 16)):
            y = mixer.scan_direction(direction, xbc[:, order], dt[:, order])[:, torch.argsort(order)]
            merged = merged + mixer.norm(y, gate)
        return mixer.out_proj(merged / len(mixer.directions))

    fused, reference = mixer(hidden), per_direction(hidden)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(fused.square().sum(), [hidden, *mixer.parameters()])
    reference_grads = torch.autograd.grad(reference.square().sum(), [hidden, *mixer.parameters()])
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def lm_pair():
    """transformers' Mamba2ForCausalLM on its reference path, and a copy on the fast path (same weights)."""
    torch.manual_seed(0)
    config = Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8, n_groups=2,
                          expand=2, chunk_size=16, vocab_size=64, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    reference = Mamba2ForCausalLM(config).eval()
    fast = copy.deepcopy(reference)
    assert enable_fast_mamba2(fast) == 2 and all(type(b.mixer) is FastMamba2Mixer for b in fast.backbone.layers)
    return reference, fast


def _states(cache):
    return [t for layer in cache.layers for t in (layer.conv_states[0], layer.recurrent_states[0])]


def test_fast_mixer_matches_transformers_forward_prefill_cache_and_decode(lm_pair, monkeypatch):
    reference, fast = lm_pair
    monkeypatch.setattr(FastMamba2Mixer, "prefill_segment", 13)  # several prefill segments
    ids = torch.randint(1, 64, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)
        ours, theirs = fast(ids, use_cache=True), reference(ids, use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-4)
        for a, b in zip(_states(ours[CACHE_NAME]), _states(theirs[CACHE_NAME])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        # continuing a cache with several tokens (chunked prefill), then single-token decoding
        more = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(fast(more, use_cache=True, **{CACHE_NAME: ours[CACHE_NAME]}).logits,
                                   reference(more, use_cache=True, **{CACHE_NAME: theirs[CACHE_NAME]}).logits,
                                   atol=1e-5, rtol=1e-4)
        token = more[:, -1:]
        for _ in range(4):
            a = fast(token, use_cache=True, **{CACHE_NAME: ours[CACHE_NAME]}).logits
            b = reference(token, use_cache=True, **{CACHE_NAME: theirs[CACHE_NAME]}).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            token = b[:, -1:].argmax(-1)
        # the token count the cache reports (5.25+ counts; 5.23/5.24 refuse `get_seq_length` on recurrent caches)
        if hasattr(theirs[CACHE_NAME], "increase_count"):
            assert ours[CACHE_NAME].get_seq_length() == theirs[CACHE_NAME].get_seq_length() == 45 + 9 + 4
        one_shot = reference(torch.cat([ids, more], 1)).logits[:, -1]
        prefix = fast(torch.cat([ids, more[:, :-1]], 1), use_cache=True)[CACHE_NAME]
        resumed = fast(more[:, -1:], use_cache=True, **{CACHE_NAME: prefix}).logits[:, -1]
        torch.testing.assert_close(resumed, one_shot, atol=1e-5, rtol=1e-4)


def test_fast_mixer_generates_the_same_tokens_with_left_padding(lm_pair, monkeypatch):
    reference, fast = lm_pair
    monkeypatch.setattr(FastMamba2Mixer, "prefill_segment", 8)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=generator) for n in (20, 13, 6)]
    ids = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, 20 - len(prompt):], mask[row, 20 - len(prompt):] = prompt, 1
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    batched = fast.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(batched, reference.generate(ids, attention_mask=mask, **kwargs))
    for row, prompt in enumerate(prompts):
        alone = fast.generate(prompt[None], **kwargs)
        assert torch.equal(batched[row, 20:], alone[0, len(prompt):])


def test_fast_mixer_gradients_equal_transformers(lm_pair):
    reference, fast = lm_pair
    ids = torch.randint(1, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for model in (reference, fast):
        model.train()
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        model.eval()
    for (name, ours), theirs in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_ml_mamba_uses_the_fast_path_by_default_and_round_trips(tmp_path):
    model, processor = tiny_model("msc")
    mixers = [module for module in model.modules() if isinstance(module, Mamba2Mixer)]
    assert mixers and all(type(m) is FastMamba2Mixer for m in mixers)
    keys = set(model.state_dict())
    reference = copy.deepcopy(model)
    enable_fast_mamba2(reference, enabled=False)
    assert set(reference.state_dict()) == keys  # the subclass adds nothing to the checkpoint

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=digit_images(2), text=[text, "Is it even? <image>"], padding=True, return_tensors="pt")
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)  # the remote code copy
    assert [type(m).__name__ for m in reloaded.modules() if isinstance(m, Mamba2Mixer)] == ["FastMamba2Mixer"] * 2
    assert torch.equal(reloaded.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))

    off = MLMambaForConditionalGeneration(tiny_config("msc", use_fast_cpu_path=False))
    assert [type(m) for m in off.modules() if isinstance(m, Mamba2Mixer)] == [Mamba2Mixer] * 2


def test_fast_mixer_in_bfloat16_is_as_accurate_as_transformers(lm_pair):
    reference, _ = lm_pair
    ids = torch.randint(1, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    low = copy.deepcopy(reference).to(torch.bfloat16)
    fast_low = copy.deepcopy(low)
    enable_fast_mamba2(fast_low)
    with torch.no_grad():
        exact = reference(ids).logits
        error_theirs = (low(ids).logits.float() - exact).abs().max()
        error_ours = (fast_low(ids).logits.float() - exact).abs().max()
    assert error_ours <= 1.5 * error_theirs + 1e-3, (error_ours, error_theirs)
