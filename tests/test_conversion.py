"""Converters of the original checkpoints, on synthetic tiny checkpoints with exactly the original key names and
layouts (built here). Each converted folder is loaded through the Auto classes and compared with the original layer
math on the same weights: ML-Mamba's connector against a direct re-implementation of the authors' bidirectional
Mamba-2 block (forward + flipped scan, per-direction gated RMSNorm, averaged, out_proj), the LMs against transformers'
own `Mamba2ForCausalLM` / `MambaForCausalLM.load_state_dict` on the original keys; the full-size release layouts
(meta tensors) against the presets. Budget: ~20 s."""

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from utils import DINOV2_REG, IMAGE_SIZE, SIGLIP, digit_images, tokenizer

from ml_mamba.conversion import ConversionError, convert_cobra, convert_ml_mamba
from ml_mamba.conversion.cli import main as convert_cli

D_MODEL, VOCAB, HEADS, HEAD_DIM, D_STATE, CONV = 64, 320, 8, 16, 16, 4
D_INNER = HEADS * HEAD_DIM  # expand 2
CONV_DIM = D_INNER + 2 * D_STATE  # ngroups 1
VISION_DIM = DINOV2_REG["hidden_size"] + SIGLIP["hidden_size"]
NUM_PATCHES = (IMAGE_SIZE // SIGLIP["patch_size"]) ** 2


def _randn(generator, *shape, scale=0.1):
    return torch.randn(*shape, generator=generator) * scale


def mamba2_mixer_weights(g, bidirectional=False) -> dict:
    """One mamba_ssm `Mamba2` mixer (authors' fork: `bimamba_type="v2"` adds the `_b` copies)."""
    dt = torch.exp(torch.rand(HEADS, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    weights = {"in_proj.weight": _randn(g, 2 * D_INNER + 2 * D_STATE + HEADS, D_MODEL),
               "conv1d.weight": _randn(g, CONV_DIM, 1, CONV, scale=0.3), "conv1d.bias": _randn(g, CONV_DIM),
               "dt_bias": dt + torch.log(-torch.expm1(-dt)), "A_log": torch.log(1 + 15 * torch.rand(HEADS, generator=g)),
               "D": 1 + _randn(g, HEADS), "norm.weight": 1 + _randn(g, D_INNER),
               "out_proj.weight": _randn(g, D_MODEL, D_INNER)}
    if bidirectional:  # different values in the reversed direction, so a swapped mapping would be caught
        weights.update({"conv1d_b.weight": _randn(g, CONV_DIM, 1, CONV, scale=0.3), "conv1d_b.bias": _randn(g, CONV_DIM),
                        "dt_bias_b": weights["dt_bias"].flip(0), "A_log_b": weights["A_log"] + 0.5,
                        "D_b": 1 + _randn(g, HEADS)})
    return weights


def mamba_ssm_lm_weights(g, kind="mamba2", layers=2, head_prefix="") -> dict:
    """A mamba_ssm `MambaLMHeadModel` state dict (`backbone.embedding`, ..., tied `lm_head`)."""
    state = {"backbone.embedding.weight": _randn(g, VOCAB, D_MODEL, scale=0.5)}
    for layer in range(layers):
        if kind == "mamba2":
            mixer = mamba2_mixer_weights(g)
        else:  # mamba_simple.Mamba: d_state 8, dt_rank ceil(64 / 16) = 4
            mixer = {"in_proj.weight": _randn(g, 2 * 128, D_MODEL), "conv1d.weight": _randn(g, 128, 1, CONV, scale=0.3),
                     "conv1d.bias": _randn(g, 128), "x_proj.weight": _randn(g, 4 + 2 * 8, 128),
                     "dt_proj.weight": _randn(g, 128, 4, scale=0.3), "dt_proj.bias": _randn(g, 128) - 4,
                     "A_log": torch.log(torch.arange(1, 9.0)).repeat(128, 1), "D": torch.ones(128),
                     "out_proj.weight": _randn(g, D_MODEL, 128)}
        state.update({f"backbone.layers.{layer}.mixer.{k}": v for k, v in mixer.items()})
        state[f"backbone.layers.{layer}.norm.weight"] = 1 + _randn(g, D_MODEL)
    state["backbone.norm_f.weight"] = 1 + _randn(g, D_MODEL)
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as mamba_ssm saves it
    return {head_prefix + k: v for k, v in state.items()}


def ml_mamba_checkpoint(g) -> dict:
    """ML-Mamba's latest-checkpoint.pt layout: {"model": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}}."""
    bidirectional = {}
    for layer in range(2):
        bidirectional.update({f"layers.{layer}.mixer.{k}": v for k, v in mamba2_mixer_weights(g, True).items()})
        bidirectional.update({f"layers.{layer}.norm.weight": 1 + _randn(g, D_MODEL),
                              f"layers.{layer}.norm.bias": _randn(g, D_MODEL)})
        for name, shape in (("w1", (D_MODEL, D_MODEL)), ("w2", (D_MODEL, D_MODEL)), ("w3", (D_MODEL, D_MODEL))):
            bidirectional[f"layers.{layer}.mlp.{name}.weight"] = _randn(g, *shape, scale=0.2)
            bidirectional[f"layers.{layer}.mlp.{name}.bias"] = _randn(g, shape[0])
    bidirectional.update({"norm_f.weight": 1 + _randn(g, D_MODEL), "norm_f.bias": _randn(g, D_MODEL)})
    projector = {}
    for index, (rows, cols) in zip((0, 2, 4), ((4 * D_MODEL, D_MODEL), (D_MODEL, 4 * D_MODEL), (D_MODEL, D_MODEL))):
        projector[f"projector.{index}.weight"] = _randn(g, rows, cols, scale=0.2)
        projector[f"projector.{index}.bias"] = _randn(g, rows)
    return {"model": {"llm_backbone": mamba_ssm_lm_weights(g), "mlp": {"0.weight": _randn(g, D_MODEL, VISION_DIM),
                                                                        "0.bias": _randn(g, D_MODEL)},
                      "bidirectional_mamba": bidirectional, "projector": projector}}


# ---- the authors' layer math, written out from their code (mamba_ssm fork, ML-Mamba) ----

def _causal_conv_silu(xbc, weight, bias):
    length = xbc.shape[1]
    out = F.conv1d(xbc.transpose(1, 2), weight, bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    return F.silu(out[..., :length]).transpose(1, 2)


def _ssd_sequential(x, dt, A, B, C, D):
    """h_t = exp(dt A) h + dt B x;  y = C h + D x. x (b,l,h,p), dt (b,l,h), B/C (b,l,n) (one group)."""
    state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + \
            (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


def _mamba2_scan_gated(zxbcdt, conv_w, conv_b, dt_bias, A_log, D, norm_w):
    """mamba_split_conv1d_scan_combined without out_proj: conv, SSD scan, gated RMSNorm (norm_before_gate=False)."""
    z, xbc, dt = zxbcdt.split([D_INNER, CONV_DIM, HEADS], dim=-1)
    x, B, C = _causal_conv_silu(xbc, conv_w, conv_b).split([D_INNER, D_STATE, D_STATE], dim=-1)
    batch, length = x.shape[:2]
    y = _ssd_sequential(x.reshape(batch, length, HEADS, HEAD_DIM), F.softplus(dt + dt_bias), -torch.exp(A_log), B, C, D)
    gated = y.reshape(batch, length, D_INNER) * F.silu(z)
    return gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w


def authors_bimamba_v2(p, u):
    zxbcdt = u @ p["in_proj.weight"].T
    out = _mamba2_scan_gated(zxbcdt, p["conv1d.weight"], p["conv1d.bias"], p["dt_bias"], p["A_log"], p["D"],
                             p["norm.weight"])
    out_b = _mamba2_scan_gated(zxbcdt.flip(1), p["conv1d_b.weight"], p["conv1d_b.bias"], p["dt_bias_b"], p["A_log_b"],
                               p["D_b"], p["norm.weight"])
    return ((out + out_b.flip(1)) / 2) @ p["out_proj.weight"].T


def authors_ml_mamba_connector(parts, features):
    """mlp -> Bidirectional_Mamba (v2 blocks: x + mixer(x); x + SwiGLU(LayerNorm(x)); norm_f) -> FusedMLPProjector."""
    mlp, bi, proj = parts["mlp"], parts["bidirectional_mamba"], parts["projector"]
    x = F.gelu(F.linear(features, mlp["0.weight"], mlp["0.bias"]))
    for layer in range(2):
        p = {k.removeprefix(f"layers.{layer}."): v for k, v in bi.items() if k.startswith(f"layers.{layer}.")}
        x = x + authors_bimamba_v2({k.removeprefix("mixer."): v for k, v in p.items() if k.startswith("mixer.")}, x)
        h = F.layer_norm(x, (D_MODEL,), p["norm.weight"], p["norm.bias"])
        x = x + F.linear(F.silu(F.linear(h, p["mlp.w1.weight"], p["mlp.w1.bias"]))
                         * F.linear(h, p["mlp.w2.weight"], p["mlp.w2.bias"]), p["mlp.w3.weight"], p["mlp.w3.bias"])
    x = F.layer_norm(x, (D_MODEL,), bi["norm_f.weight"], bi["norm_f.bias"])
    for index in (0, 2, 4):
        x = F.linear(x, proj[f"projector.{index}.weight"], proj[f"projector.{index}.bias"])
        x = F.gelu(x) if index < 4 else x
    return x


# ---- fixtures: vision tower ports, tokenizer, checkpoints on disk ----

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{k: v for k, v in DINOV2_REG.items()
                                                                  if k != "model_type"}))
    siglip = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"}))
    assert siglip.config.vision_use_head  # the port has the attention-pool head the converter must drop
    dino.save_pretrained(root / "dinov2")
    siglip.save_pretrained(root / "siglip")
    tokenizer().save_pretrained(root / "tokenizer")
    return {"root": root, "towers": [str(root / "dinov2"), str(root / "siglip")], "tokenizer": str(root / "tokenizer"),
            "dino": dino.eval(), "siglip": siglip.eval()}


def _vision_features(sources, pixel_values):
    """Patch features at layer -2 of both ports, DINOv2 first (registers/CLS dropped), as the originals read them."""
    with torch.no_grad():
        dino = sources["dino"](pixel_values=pixel_values[:, :3], output_hidden_states=True).hidden_states[-2]
        siglip = sources["siglip"](pixel_values=pixel_values[:, 3:], output_hidden_states=True).hidden_states[-2]
    return torch.cat([dino[:, -NUM_PATCHES:], siglip[:, -NUM_PATCHES:]], dim=-1)


def _image_inputs(folder, question="Which digit is shown?"):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                             {"type": "image", "image": digit_images(1, start=3)[0]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    return processor, inputs


def test_ml_mamba_checkpoint_converts_and_matches_the_authors_math(sources, tmp_path):
    checkpoint = ml_mamba_checkpoint(torch.Generator().manual_seed(1))
    torch.save(checkpoint, tmp_path / "latest-checkpoint.pt")
    report = convert_ml_mamba(str(tmp_path), tmp_path / "converted", vision_towers=sources["towers"],
                              image_size=IMAGE_SIZE, tokenizer=sources["tokenizer"])
    assert report["tensors_checked"] > 0 and report["next_token"] is not None
    card = ModelCard.load(tmp_path / "converted" / "README.md")
    assert card.data.base_model == ["huangwenjun1994/ML-Mamba", "state-spaces/mamba2-2.7b"]  # local towers left out
    assert "Converted with `ml-mamba-convert`" in card.text and "converted" in card.data.tags

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted", trust_remote_code=True).eval()
    config = model.config
    assert (config.connector_type, config.connector_num_blocks, config.connector_use_swiglu) == ("msc", 2, True)
    assert (config.connector_state_size, config.connector_head_dim, config.connector_n_groups) == (D_STATE, HEAD_DIM, 1)
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
        model.model.language_model.embeddings.weight.data_ptr()

    processor, inputs = _image_inputs(tmp_path / "converted")
    # The image-first Zephyr layout of the originals: all image tokens, then "<|user|>\n{question}<|endoftext|>...".
    ids = inputs["input_ids"][0]
    assert (ids[:NUM_PATCHES] == config.image_token_id).all() and (ids[NUM_PATCHES:] != config.image_token_id).all()
    assert processor.decode(ids[NUM_PATCHES:]) == "<|user|>\nWhich digit is shown?<|endoftext|>\n<|assistant|>\n"

    parts = checkpoint["model"]
    features = _vision_features(sources, inputs["pixel_values"])
    with torch.no_grad():
        ours = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        reference = authors_ml_mamba_connector(parts, features)
        torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)

        # Whole model: the authors' LM (transformers' Mamba2 loading the original keys) on [image features; text].
        lm = Mamba2ForCausalLM(model.config.text_config).eval()
        lm.load_state_dict(parts["llm_backbone"], strict=True)  # its pre-hook renames backbone.embedding
        text = lm.backbone.embeddings(ids[None, NUM_PATCHES:])
        expected = lm(inputs_embeds=torch.cat([reference, text], dim=1)).logits
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


def _cobra_run(folder, g, arch="no-align+fused-gelu-mlp"):
    llm = mamba_ssm_lm_weights(g, kind="mamba", head_prefix="llm.")
    projector = {}
    for index, (rows, cols) in zip((0, 2, 4), ((4 * VISION_DIM, VISION_DIM), (D_MODEL, 4 * VISION_DIM),
                                               (D_MODEL, D_MODEL))):
        projector[f"projector.{index}.weight"] = _randn(g, rows, cols, scale=0.2)
        projector[f"projector.{index}.bias"] = _randn(g, rows)
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"projector": projector, "llm_backbone": llm}}, folder / "checkpoints" / "latest-checkpoint.pt")
    (folder / "config.json").write_text(json.dumps({"model": {
        "model_id": "cobra+3b", "arch_specifier": arch, "vision_backbone_id": "dinosiglip-vit-so-384px",
        "llm_backbone_id": "mamba-2.8b-zephyr", "image_resize_strategy": "resize-naive", "llm_max_length": 2048}}))
    return projector, llm


def test_cobra_checkpoint_converts_and_matches_the_original_math(sources, tmp_path):
    projector, llm = _cobra_run(tmp_path / "cobra+3b", torch.Generator().manual_seed(2))
    convert_cobra(str(tmp_path / "cobra+3b"), tmp_path / "converted", vision_towers=sources["towers"],
                  image_size=IMAGE_SIZE, tokenizer=sources["tokenizer"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted", trust_remote_code=True).eval()
    assert (model.config.connector_type, model.config.text_config.model_type) == ("fused-mlp", "mamba")
    assert model.config.text_config.time_step_rank == 4 and model.config.text_config.state_size == 8

    _, inputs = _image_inputs(tmp_path / "converted")
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        x = _vision_features(sources, inputs["pixel_values"])
        for index in (0, 2, 4):  # Cobra's FusedMLPProjector
            x = F.linear(x, projector[f"projector.{index}.weight"], projector[f"projector.{index}.bias"])
            x = F.gelu(x) if index < 4 else x
        lm = MambaForCausalLM(model.config.text_config).eval()
        lm.load_state_dict({k.removeprefix("llm."): v for k, v in llm.items()}, strict=True)
        text = lm.backbone.embeddings(ids[None, NUM_PATCHES:])
        expected = lm(inputs_embeds=torch.cat([x, text], dim=1)).logits
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_mamba_ssm_lm_converts_through_the_cli(kind, sources, tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    state = mamba_ssm_lm_weights(g, kind=kind)
    ssm_cfg = {"layer": "Mamba2", "d_state": D_STATE, "headdim": HEAD_DIM} if kind == "mamba2" else {"d_state": 8}
    source = tmp_path / "source"
    source.mkdir()
    # vocab 317 padded to a multiple of 8 = 320 rows, as mamba_ssm pads 50277 -> 50280/50288
    (source / "config.json").write_text(json.dumps({"d_model": D_MODEL, "n_layer": 2, "vocab_size": 317,
                                                    "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True,
                                                    "fused_add_norm": True, "pad_vocab_size_multiple": 8}))
    torch.save(state, source / "pytorch_model.bin")
    assert convert_cli(["mamba-lm", str(source), "--output-dir", str(tmp_path / "out"),
                        "--tokenizer", sources["tokenizer"]]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == kind

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config_class, model_class = (Mamba2Config, Mamba2ForCausalLM) if kind == "mamba2" else (MambaConfig,
                                                                                           MambaForCausalLM)
    assert isinstance(converted, model_class) and converted.config.vocab_size == 320
    original = model_class(config_class(**converted.config.to_dict())).eval()
    original.load_state_dict(state, strict=True)  # the original keys, renamed by transformers' own load hook
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, original(input_ids=ids).logits)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_wrong_checkpoints_are_refused_with_the_keys(sources, tmp_path, capsys):
    g = torch.Generator().manual_seed(4)
    checkpoint = ml_mamba_checkpoint(g)
    checkpoint["model"]["bidirectional_mamba"]["layers.0.mixer.extra_gate"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "extra.pt")
    kwargs = dict(vision_towers=sources["towers"], image_size=IMAGE_SIZE, tokenizer=sources["tokenizer"])
    with pytest.raises(ConversionError, match=r"(?s)bidirectional_mamba: 1 key\(s\) that no conversion rule uses.*"
                                              r"layers\.0\.mixer\.extra_gate"):
        convert_ml_mamba(str(tmp_path / "extra.pt"), tmp_path / "out1", **kwargs)

    checkpoint = ml_mamba_checkpoint(g)
    del checkpoint["model"]["bidirectional_mamba"]["layers.1.mixer.D_b"]
    checkpoint["model"]["projector"]["projector.4.weight"] = torch.zeros(D_MODEL, D_MODEL + 1)
    torch.save(checkpoint, tmp_path / "missing.pt")
    with pytest.raises(ConversionError) as error:
        convert_ml_mamba(str(tmp_path / "missing.pt"), tmp_path / "out2", **kwargs)
    message = str(error.value)
    assert "model.connector.blocks.1.mixer.directions.1.D" in message and "missing" in message
    assert "model.connector.projector.linear_3.weight: checkpoint (64, 65), model (64, 64)" in message
    assert not (tmp_path / "out2").exists()  # shapes are checked before anything is written

    torch.save({"model": {"projector": {}}}, tmp_path / "cobra.pt")
    assert convert_cli(["ml-mamba", str(tmp_path / "cobra.pt"), "--output-dir", str(tmp_path / "out3"),
                        "--vision-towers", *sources["towers"], "--tokenizer", sources["tokenizer"]]) == 1
    assert "missing ['bidirectional_mamba', 'llm_backbone', 'mlp']" in capsys.readouterr().err


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _full_size_mamba_lm(kind, prefix=""):
    """The released LMs' exact key names and shapes as meta tensors (mamba2-2.7b; mamba-2.8b-zephyr), no values."""
    d, vocab = 2560, 50288 if kind == "mamba2" else 50280
    state = {"backbone.embedding.weight": _meta(vocab, d), "backbone.norm_f.weight": _meta(d)}
    for layer in range(64):
        if kind == "mamba2":
            mixer = {"in_proj.weight": (10576, d), "conv1d.weight": (5376, 1, 4), "conv1d.bias": (5376,),
                     "dt_bias": (80,), "A_log": (80,), "D": (80,), "norm.weight": (5120,), "out_proj.weight": (d, 5120)}
        else:
            mixer = {"in_proj.weight": (10240, d), "conv1d.weight": (5120, 1, 4), "conv1d.bias": (5120,),
                     "x_proj.weight": (160 + 32, 5120), "dt_proj.weight": (5120, 160), "dt_proj.bias": (5120,),
                     "A_log": (5120, 16), "D": (5120,), "out_proj.weight": (d, 5120)}
        state.update({f"backbone.layers.{layer}.mixer.{k}": _meta(*v) for k, v in mixer.items()})
        state[f"backbone.layers.{layer}.norm.weight"] = _meta(d)
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    return {prefix + k: v for k, v in state.items()}


def _language_and_connector_shapes(config):
    from modeling_ml_mamba import MLMambaForConditionalGeneration

    with torch.device("meta"):
        model = MLMambaForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}


@pytest.mark.parametrize("release", ["ml-mamba-2.7b", "cobra-3.5b"])
def test_full_size_release_layouts_map_onto_the_presets(release):
    """The real checkpoints' key names and shapes (as meta tensors) fill exactly the preset model, tied head included."""
    from modeling_ml_mamba import preset_config

    from ml_mamba.conversion import map_cobra, map_ml_mamba
    from ml_mamba.conversion.checkpoints import check_against

    preset = preset_config(release)
    if release == "ml-mamba-2.7b":
        mixer = {"in_proj.weight": (10576, 2560), "out_proj.weight": (2560, 5120), "norm.weight": (5120,)}
        for suffix in ("", "_b"):
            mixer.update({f"conv1d{suffix}.weight": (5376, 1, 4), f"conv1d{suffix}.bias": (5376,),
                          f"dt_bias{suffix}": (80,), f"A_log{suffix}": (80,), f"D{suffix}": (80,)})
        bidirectional = {"norm_f.weight": _meta(2560), "norm_f.bias": _meta(2560)}
        for layer in range(2):
            bidirectional.update({f"layers.{layer}.mixer.{k}": _meta(*v) for k, v in mixer.items()})
            bidirectional.update({f"layers.{layer}.{name}": _meta(2560) for name in ("norm.weight", "norm.bias")})
            for w in ("w1", "w2", "w3"):
                bidirectional.update({f"layers.{layer}.mlp.{w}.weight": _meta(2560, 2560),
                                      f"layers.{layer}.mlp.{w}.bias": _meta(2560)})
        parts = {"llm_backbone": _full_size_mamba_lm("mamba2"), "bidirectional_mamba": bidirectional,
                 "mlp": {"0.weight": _meta(2560, 2176), "0.bias": _meta(2560)},
                 "projector": {"projector.0.weight": _meta(10240, 2560), "projector.0.bias": _meta(10240),
                               "projector.2.weight": _meta(2560, 10240), "projector.2.bias": _meta(2560),
                               "projector.4.weight": _meta(2560, 2560), "projector.4.bias": _meta(2560)}}
        text_config, converted, fields = map_ml_mamba(parts)
    else:
        parts = {"llm_backbone": _full_size_mamba_lm("mamba", prefix="llm."),
                 "projector": {"projector.0.weight": _meta(8704, 2176), "projector.0.bias": _meta(8704),
                               "projector.2.weight": _meta(2560, 8704), "projector.2.bias": _meta(2560),
                               "projector.4.weight": _meta(2560, 2560), "projector.4.bias": _meta(2560)}}
        text_config, converted, fields = map_cobra(parts, "fused-mlp")
    mixer = preset.connector_mixer_kwargs()  # the preset leaves the MSC mixer settings to the Mamba-2 LM's
    for key, value in fields.items():
        assert mixer.get(key.removeprefix("connector_"), getattr(preset, key)) == value, key
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "expand", "tie_word_embeddings"):
        assert getattr(text_config, key) == getattr(preset.text_config, key), key
    converted["lm_head.weight"] = converted["model.language_model.embeddings.weight"]  # tied, as materialize does
    check_against(converted, _language_and_connector_shapes(preset), release)
