"""The static-state decode step (`ml_mamba_decode`) against transformers' eager path: per-step logits, generated
tokens (greedy, sampling, beam search, left-padded batches, streaming) and the compiled step, for Mamba-2 and
Mamba-1 language models."""

import copy
import threading

import pytest
import torch
from transformers import TextIteratorStreamer
from utils import digit_images, tiny_model

from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME
from modeling_ml_mamba.ml_mamba_cpu_kernels import (cpu_kernels_available, fast_int8_gemv_available, ssm_step,
                                                    ssm_step_reference)


def _pair(text, seed=0):
    model, processor = tiny_model("mlp", text=text, seed=seed)
    return model, processor


def _batch(processor, count=3):
    questions = ["Which digit?", "Is the digit odd or even? Tell me.", "Odd?"][:count]
    return processor(images=digit_images(count), text=[f"<image>{q}" for q in questions], padding=True,
                     return_tensors="pt")


def _steps_by_implementation(model, inputs, steps=6, implementations=("eager", "static")):
    """{implementation: (the logits of ``steps`` greedy cached one-token steps after the prefill, the cache)}."""
    results = {}
    for implementation in implementations:
        model.config.decode_implementation = implementation
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
            logits = []
            for _ in range(steps):
                step = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
                logits.append(step.logits)
                token = step.logits[:, -1:].argmax(-1)
        results[implementation] = torch.cat(logits, 1), cache
    return results


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_static_steps_equal_the_eager_path(text):
    model, processor = _pair(text)
    inputs = _batch(processor)
    results = _steps_by_implementation(model, inputs)
    torch.testing.assert_close(results["static"][0], results["eager"][0], atol=2e-5, rtol=1e-4)
    if text == "mamba2" and cpu_kernels_available():  # the states went through the one-pass C kernel
        assert model._static_decoder().fused_ssm and results["static"][1].get_recurrent_state(0).is_contiguous()
    for i in range(model.config.text_config.num_hidden_layers):  # the same states afterwards
        torch.testing.assert_close(results["static"][1].get_recurrent_state(i),
                                   results["eager"][1].get_recurrent_state(i), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(results["static"][1].get_conv_state(i), results["eager"][1].get_conv_state(i))


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_generate_gives_the_same_tokens(text):
    model, processor = _pair(text, seed=1)
    inputs = _batch(processor)
    runs = {
        "greedy": dict(do_sample=False),
        "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
        "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    }
    for name, kwargs in runs.items():
        tokens = {}
        for implementation in ("eager", "static"):
            model.config.decode_implementation = implementation
            torch.manual_seed(0)
            tokens[implementation] = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, **kwargs)
        assert torch.equal(tokens["static"], tokens["eager"]), name
    # left padding: each row equals the row generated alone
    model.config.decode_implementation = "static"
    batched = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for row in range(3):
        alone = processor(images=digit_images(3)[row:row + 1],
                          text=[["<image>Which digit?", "<image>Is the digit odd or even? Tell me.",
                                 "<image>Odd?"][row]], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(batched[row, -8:], single[0, -8:])


def test_streaming_through_the_static_step():
    model, processor = _pair("mamba2")
    inputs = _batch(processor, count=1)
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=6, min_new_tokens=6,
                                                                 do_sample=False, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == processor.decode(expected[0, inputs["input_ids"].shape[1]:])


def test_large_batches_and_the_cache_count():
    model, processor = _pair("mamba2")
    inputs = processor(images=digit_images(32) * 2, text=["<image>Which digit?"] * 64, return_tensors="pt")
    tokens = {}
    for implementation in ("eager", "static"):
        model.config.decode_implementation = implementation
        tokens[implementation] = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(tokens["static"], tokens["eager"])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = getattr(out, CACHE_NAME)
        model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_NAME: cache})
    if hasattr(cache, "increase_count"):  # transformers 5.25+ counts the tokens a cache has seen
        assert int(cache.get_seq_length()) == inputs["input_ids"].shape[1] + 1


def test_compiled_step_equals_the_eager_path():
    model, processor = _pair("mamba2", seed=2)
    inputs = _batch(processor, count=2)
    model.config.decode_implementation = "eager"
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    model.config.decode_implementation = "compiled"
    got = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_graph_decode_is_the_static_step_on_cpu():
    model, processor = _pair("mamba2", seed=3)
    inputs = _batch(processor, count=2)
    model.config.decode_implementation = "eager"
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    model.config.decode_implementation = "graph"
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False), expected)
    assert not model._static_decoder().graph  # nothing to capture on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh runs this)")
@pytest.mark.parametrize("text", ["mamba2", "mamba"])
@pytest.mark.parametrize("implementation", ["graph", "compiled"])
def test_cuda_graph_decode_equals_the_eager_path(text, implementation):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, processor = _pair(text, seed=4)
    model = model.cuda()
    inputs = _batch(processor).to("cuda")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.config.decode_implementation = "eager"
    expected = model.generate(**inputs, **kwargs)
    model.config.decode_implementation = implementation
    for _ in range(2):  # a second call captures again for its new cache
        got = model.generate(**inputs, **kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.logits, expected.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert model._static_decoder().graph


def test_unknown_decode_implementation_is_refused():
    from utils import tiny_config

    with pytest.raises(ValueError, match="Unknown decode_implementation 'fast'"):
        tiny_config("mlp", decode_implementation="fast")


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_a_cached_step_ignores_the_mask_of_the_past(text):
    """`generate` passes the attention mask of the whole sequence at every step: the eager path must read only the
    new token's column (transformers' Mamba-1 would broadcast the longer mask over the new token)."""
    import copy

    model, processor = _pair(text)
    model.config.decode_implementation = "eager"
    inputs = _batch(processor)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
        copied = copy.deepcopy(cache)
        plain = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache}).logits
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        masked = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_NAME: copied}).logits
    assert masked.shape == plain.shape == (3, 1, model.config.text_config.vocab_size)
    torch.testing.assert_close(masked, plain)


def test_decode_layout_keeps_values_ties_and_saving(tmp_path):
    """The static step of a Mamba-1 LM (and of a Mamba-2 LM without our C step) stores the LM's float32 weights
    transposed on CPU (a faster GEMV); values, weight tying, `save_pretrained` and reloading are unchanged, and only
    the LM's weights change layout."""
    from transformers import AutoModelForImageTextToText

    model, processor = _pair("mamba")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _batch(processor, count=1)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight.t().is_contiguous()
    assert model.lm_head.weight is model.model.language_model.get_input_embeddings().weight
    connector_weights = [p for n, p in model.model.connector.named_parameters() if p.dim() == 2]
    assert all(p.is_contiguous() for p in connector_weights)
    model.save_pretrained(tmp_path)
    assert not model.lm_head.weight.is_contiguous()  # the decode layout again after saving
    assert all(p.is_contiguous() for p in connector_weights)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(before[k], reloaded[k]) for k in before)


@pytest.mark.parametrize("kind, rows", [("float32", 1), ("float32", 3), ("bfloat16", 1), ("int8", 1), ("int8", 2),
                                        ("int8-bf16-activations", 1)])
def test_compiled_projection_equals_the_layer(kind, rows):
    """`project` inside a compiled step (the fused multiply-reduce at few rows, the layer's own kernel above and for
    int8 activations) gives the layer's output: against the float64 product of the stored weights, within the
    layer's own precision."""
    from modeling_ml_mamba.ml_mamba_decode import project
    from modeling_ml_mamba.ml_mamba_quant import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    if kind.startswith("int8"):
        layer = Int8Linear(linear, int8_activations=None if kind == "int8" else False)
    else:
        layer = linear.to(getattr(torch, kind))
    x = torch.randn(rows, 64).to(layer.weight.dtype)
    reference = x.double() @ layer.weight.double().T + layer.bias.double()
    got = torch.compile(project, fullgraph=True, dynamic=False)(layer, x)
    assert got.dtype == x.dtype and got.shape == (rows, 48)
    tolerance = 1e-5 if kind == "float32" else 2e-2  # bf16 output / bf16 or block-wise int8 activations
    torch.testing.assert_close(got.double(), reference, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got, layer(x), atol=tolerance, rtol=tolerance)  # the same as outside compile


@pytest.mark.skipif(not cpu_kernels_available(), reason="no C compiler to build our CPU kernels")
@pytest.mark.parametrize("batch, heads, head_dim, groups, state_size", [(1, 24, 64, 1, 128), (3, 8, 5, 2, 17)])
def test_one_pass_ssm_kernel_equals_its_reference(batch, heads, head_dim, groups, state_size):
    """`ssm_step` (eager and inside a compiled function, where it must update the state in place) against the eager
    static step's PyTorch arithmetic: the same output and the same new state."""
    torch.manual_seed(heads)
    state = torch.randn(batch, heads, head_dim, state_size)
    x, D = torch.randn(batch, heads, head_dim), torch.randn(heads)
    dt, decay = torch.rand(batch, heads), torch.rand(batch, heads)
    B, C = torch.randn(batch, groups, state_size), torch.randn(batch, groups, state_size)
    expected_state = state.clone()
    expected = ssm_step_reference(expected_state, x, dt, decay, B, C, D)
    for run in (ssm_step, torch.compile(lambda *args: torch.ops.ml_mamba.ssm_step(*args), fullgraph=True)):
        got_state = state.clone()
        got = run(got_state, x, dt, decay, B, C, D)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_state, expected_state, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="B must be a float32 CPU tensor of shape"):
        ssm_step(state.clone(), x, dt, decay, B[:, :, 1:], C, D)
    with pytest.raises(ValueError, match="state must be contiguous"):
        ssm_step(state.transpose(2, 3).contiguous().transpose(2, 3), x, dt, decay, B, C, D)


@pytest.mark.skipif(not fast_int8_gemv_available(), reason="no x86-64 AVX2 CPU and C compiler for our kernels")
@pytest.mark.parametrize("precision", ["int8", "float32"])
@pytest.mark.parametrize("variant", ["default", "groups, biases, dt limits"])
def test_step_in_c_equals_the_eager_path(variant, precision):
    """A Mamba-2 model's static decode (and an int8 model's compiled one) runs the whole step in C (`Mamba2CStep`):
    per-step logits and states as transformers' eager modules give them (the same int8 kernel for int8), n_groups >
    1, projection and conv biases and dt limits included; left-padded batches give the same tokens."""
    from utils import text_config

    from modeling_ml_mamba.ml_mamba_quant import quantize_int8

    overrides = {} if variant == "default" else {"text_config": {**text_config("mamba2"), "n_groups": 2,
                                                                 "use_bias": True, "time_step_limit": (0.05, 2.0)}}
    model, processor = tiny_model("mlp", seed=6, **overrides)
    with torch.no_grad():
        for block in model.model.language_model.layers:  # make the parameters the step reads matter
            block.mixer.dt_bias.normal_()
            block.mixer.D.normal_()
            block.norm.weight.uniform_(0.5, 1.5)
    if precision == "int8":
        quantize_int8(model)
    inputs = _batch(processor)
    results = _steps_by_implementation(model, inputs, steps=5)
    decoder = model._static_decoder()
    assert decoder.native is not None
    torch.testing.assert_close(results["static"][0], results["eager"][0], atol=1e-5, rtol=1e-4)
    for i in range(model.config.text_config.num_hidden_layers):
        torch.testing.assert_close(results["static"][1].get_recurrent_state(i),
                                   results["eager"][1].get_recurrent_state(i), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(results["static"][1].get_conv_state(i), results["eager"][1].get_conv_state(i),
                                   atol=1e-6, rtol=1e-5)
    calls = []
    native = decoder.native
    decoder.native = lambda *args: calls.append(1) or native(*args)
    expected = {}
    for implementation in ("eager", "static", "compiled"):
        model.config.decode_implementation = implementation
        if implementation == "compiled" and precision == "int8":  # float32 compiles with Inductor instead
            model._static_decoder().native = lambda *args: calls.append(1) or native(*args)
        expected[implementation] = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(expected["static"], expected["eager"]) and torch.equal(expected["compiled"], expected["eager"])
    assert len(calls) == (8 if precision == "int8" else 4)  # 4 decode steps each for static (and compiled): in C
    model.config.decode_implementation = "static"
    model._static_decoder().native = native  # the spy out
    duplicate = copy.deepcopy(model)  # a copy's C step points into the copy's own weights
    copied = duplicate._static_decoder().native
    in_proj = duplicate.model.language_model.layers[0].mixer.in_proj
    assert copied is not native and copied.layers[0].in_w == getattr(in_proj, "weight_int8", in_proj.weight).data_ptr()
    assert torch.equal(duplicate.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False),
                       expected["eager"])
