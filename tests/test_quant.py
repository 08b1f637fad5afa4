"""Low-precision inference: int8 weight-only layers (`quantize_int8`) and bfloat16 loading, against float32: the
kernel against its dequantized reference, logits within a stated tolerance on random models, the SSM parameters and
the recurrent state kept in float32, and the trained demo's held-out answers (the issue's quality bar)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText
from utils import digit_images, tiny_model

from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME
from modeling_ml_mamba.ml_mamba_cpu_kernels import (_library, cpu_kernels_available, fast_int8_gemv_available,
                                                    int8_gemv, int8_gemv_reference, supported_isas)
from modeling_ml_mamba.ml_mamba_quant import Int8Linear, quantize_int8


def test_int8_linear_matches_its_dequantized_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    quantized = Int8Linear(linear)
    error = (quantized.weight - linear.weight).abs()
    assert (error <= quantized.scale.float()[:, None] / 2 + 1e-6).all()  # round to nearest, per output channel
    x = torch.randn(6, 4, 96)  # 24 rows: more than INT8_ACTIVATION_ROWS, so PyTorch's kernel
    reference = F.linear(x.to(torch.bfloat16).float(), quantized.weight, linear.bias)
    torch.testing.assert_close(quantized(x), reference, atol=2e-2, rtol=2e-2)  # bfloat16 activations in the kernel
    assert quantized(x).dtype == x.dtype


@pytest.mark.skipif(not cpu_kernels_available(), reason="no C compiler to build our CPU kernels")
@pytest.mark.parametrize("in_features, out_features, rows", [(768, 300, 1), (1536, 70, 3), (100, 37, 2), (31, 5, 1)])
def test_int8_gemv_matches_its_reference_on_every_instruction_set(in_features, out_features, rows):
    """Each instruction set this CPU has (AVX-512 VNNI, AVX2, portable C) against the float64 reference, including
    widths that are not a multiple of 64 or 32 (the tails) and an all-zero row (scale 0)."""
    torch.manual_seed(in_features)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scale = (torch.rand(out_features) / 100 + 1e-3).to(torch.bfloat16)
    x = torch.randn(rows, in_features) * 3
    x[-1, : in_features // 2] = 0  # a block or more of zeros
    reference = int8_gemv_reference(x, weight, scale)
    assert "portable" in supported_isas()
    for isa in supported_isas():
        got = int8_gemv(x, weight, scale, isa=isa)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference, atol=1e-5 * reference.abs().max().item(), rtol=1e-5)
    # and the quantized activations stay close to the float product (block-wise int8: ~0.4 % of each block's max)
    exact = x.double() @ weight.double().t() * scale.double()
    assert (reference - exact).abs().max() <= 0.01 * exact.abs().max()
    with pytest.raises(ValueError, match="x must be"):
        int8_gemv(x[:, 1:], weight, scale)
    with pytest.raises(ValueError, match="bfloat16 scale"):
        int8_gemv(x, weight, scale.float())


@pytest.mark.skipif(not fast_int8_gemv_available(), reason="no x86-64 AVX2 CPU and C compiler for our int8 kernel")
def test_int8_linear_quantizes_activations_for_few_rows_only():
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40, bias=True)
    layer = Int8Linear(linear)
    assert layer.int8_activations
    few = torch.randn(2, 3, 96)  # 6 rows: the int8 kernel
    expected = int8_gemv_reference(few.view(-1, 96), layer.weight_int8, layer.scale) + linear.bias.double()
    torch.testing.assert_close(layer(few).double(), expected.view(2, 3, 40), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(few), layer(few))  # an op torch.compile keeps
    bfloat16_only = Int8Linear(linear, int8_activations=False)
    reference = F.linear(few.to(torch.bfloat16).float(), layer.weight, linear.bias)
    torch.testing.assert_close(bfloat16_only(few), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("why", ["switched off", "not x86-64"])
def test_without_our_kernels_decoding_falls_back_to_pytorch(why, monkeypatch):
    if why == "switched off":
        monkeypatch.setenv("ML_MAMBA_CPU_KERNELS", "0")
    else:
        monkeypatch.setattr("platform.machine", lambda: "aarch64")
    _library.cache_clear()
    try:
        assert not cpu_kernels_available() and not fast_int8_gemv_available()
        layer = Int8Linear(torch.nn.Linear(32, 8))
        assert not layer.int8_activations
        with pytest.raises(RuntimeError, match="ML_MAMBA_CPU_KERNELS=0"):
            int8_gemv(torch.randn(1, 32), layer.weight_int8, layer.scale)
        assert layer(torch.randn(1, 32)).shape == (1, 8)
        model, processor = tiny_model("mlp", text="mamba2", seed=5)
        inputs = processor(images=digit_images(1), text=["<image>Which digit?"], return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)  # the static step, PyTorch's ops
        assert not model._static_decoder().fused_ssm
        model.config.decode_implementation = "eager"
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    finally:
        monkeypatch.undo()
        _library.cache_clear()


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_int8_and_bfloat16_logits_stay_close_to_float32(text, tmp_path):
    model, processor = tiny_model("mlp", text=text, seed=3)
    inputs = processor(images=digit_images(2), text=["<image>Which digit?", "<image>Odd?"], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    int8 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert quantize_int8(int8) == (4 if text == "mamba2" else 6) + 1  # in/out (and x) projections + the head
    for name, variant in (("bfloat16", bf16), ("int8", int8)):
        with torch.no_grad():
            out = variant(**inputs, use_cache=True)
        scale = reference.abs().max()
        assert (out.logits.float() - reference).abs().max() / scale < 0.05, name  # stated tolerance: 5 % of max
        cache = getattr(out, CACHE_NAME)
        assert cache.get_recurrent_state(0).dtype == torch.float32, name
        generated = variant.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    # decode steps (one row per sequence: int8 activations in the int8 model) keep the tolerance too, while the
    # greedy tokens agree with float32's
    steps = {name: variant.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
             for name, variant in (("float32", model), ("int8", int8))}
    compared = 0
    for step, (expected, got) in enumerate(zip(steps["float32"].logits, steps["int8"].logits)):
        assert (got.float() - expected).abs().max() / expected.abs().max() < 0.05, step
        compared += 1
        end = inputs["input_ids"].shape[1] + step + 1  # the next step's input: the tokens up to this step's pick
        if not torch.equal(steps["float32"].sequences[:, :end], steps["int8"].sequences[:, :end]):
            break
    assert compared >= 2  # the prefill's logits and at least one decode step's
    for name, param in bf16.named_parameters():  # the SSM parameters and gated norms stay float32
        if name.endswith(("A_log", "dt_bias", "mixer.D", "mixer.norm.weight")):
            assert param.dtype == torch.float32, name
    assert bf16.model.language_model.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16


def test_quantized_demo_answers_as_the_float32_model(trained_demo, tmp_path):
    """The issue's bar on the trained digits demo: int8 and bfloat16 give the float32 model's greedy answer on at least
    99 % of the held-out questions and lose at most 0.5 points of accuracy."""
    from ml_mamba.evaluation import evaluate_model, load_model

    data = {"digits-vqa": os.path.join(trained_demo, "eval", "digits_vqa.jsonl")}
    answers, accuracy = {}, {}
    for name, kwargs in (("float32", {}), ("bfloat16", {"dtype": "bfloat16"}), ("int8", {"quantize": "int8"})):
        model, processor = load_model(trained_demo, device="cpu", **kwargs)
        results = evaluate_model(model, processor, ["digits-vqa"], tmp_path / name, data=data, batch_size=64,
                                 progress=False)
        accuracy[name] = results["results"]["digits-vqa"]["metrics"]["accuracy"]  # a fraction
        rows = [json.loads(line) for line in open(tmp_path / name / "digits-vqa" / "predictions.jsonl")]
        answers[name] = {row["question_id"]: row["prediction"] for row in rows}
    for name in ("bfloat16", "int8"):
        same = sum(answers[name][q] == answers["float32"][q] for q in answers["float32"]) / len(answers["float32"])
        assert same >= 0.99, (name, same)
        assert accuracy["float32"] - accuracy[name] <= 0.005, accuracy  # at most 0.5 points


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_split_gemv_layers_give_the_same_model(text):
    from modeling_ml_mamba.ml_mamba_quant import split_gemv

    model, processor = tiny_model("mlp", text=text, seed=4)
    inputs = processor(images=digit_images(3), text=["<image>Which digit?", "<image>Odd?", "<image>Even? Say."],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert split_gemv(model, parts=2) == (4 if text == "mamba2" else 6) + 1
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, atol=2e-5, rtol=1e-4)
    for implementation in ("static", "eager", "compiled"):
        model.config.decode_implementation = implementation
        got = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(got, expected), implementation
