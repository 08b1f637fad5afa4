"""MLMambaConfig: composition, presets with the published shapes (built on the meta device), serialisation and
clear errors. Budget: ~10 s."""

import pytest
import torch
from utils import CLIP, DINOV2_REG, SIGLIP, text_config, tiny_config

from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, preset_config
from transformers import AutoConfig, LlamaConfig, SiglipVisionConfig


def _meta_model(config):
    with torch.device("meta"):
        return MLMambaForConditionalGeneration(config)


def _shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_ml_mamba_preset_reproduces_the_published_shapes():
    config = preset_config("ml-mamba-2.7b")
    assert config.vision_config.hidden_size == 1024 + 1152 == 2176
    assert config.num_image_tokens == 729 and config.vision_feature_layer == -2
    assert config.tie_word_embeddings is True
    model = _meta_model(config)
    lm = config.text_config
    assert (lm.model_type, lm.hidden_size, lm.num_hidden_layers, lm.state_size, lm.head_dim, lm.n_groups,
            lm.vocab_size) == ("mamba2", 2560, 64, 128, 64, 1, 50288)
    assert 2.69e9 < _count(model.model.language_model) < 2.71e9  # "Mamba-2 2.7B"
    shapes = _shapes(model.model.connector)
    d_inner, conv_dim = 5120, 5120 + 2 * 128
    assert shapes["input_proj.weight"] == (2560, 2176)
    assert len(model.model.connector.blocks) == 2
    for block in range(2):
        prefix = f"blocks.{block}."
        assert shapes[prefix + "mixer.in_proj.weight"] == (2 * d_inner + 2 * 128 + 80, 2560)
        for direction in range(2):  # bidirectional: separate conv/dt/A/D per direction
            assert shapes[prefix + f"mixer.directions.{direction}.conv1d.weight"] == (conv_dim, 1, 4)
            assert shapes[prefix + f"mixer.directions.{direction}.A_log"] == (80,)
        assert f"{prefix}mixer.directions.2.A_log" not in shapes
        assert shapes[prefix + "mixer.out_proj.weight"] == (2560, d_inner)
        assert shapes[prefix + "mlp.w1.weight"] == shapes[prefix + "mlp.w3.weight"] == (2560, 2560)
    assert shapes["norm_f.weight"] == (2560,)
    assert [shapes[f"projector.linear_{i}.weight"] for i in (1, 2, 3)] == [(10240, 2560), (2560, 10240), (2560, 2560)]
    assert model.lm_head.weight is model.model.language_model.embeddings.weight


def test_cobra_presets_reproduce_the_published_shapes():
    config = preset_config("cobra-3.5b")
    model = _meta_model(config)
    assert config.text_config.model_type == "mamba" and config.text_config.state_size == 16
    shapes = _shapes(model.model.connector)
    assert [shapes[f"linear_{i}.weight"] for i in (1, 2, 3)] == [(8704, 2176), (2560, 8704), (2560, 2560)]
    assert 3.4e9 < _count(model) < 3.6e9  # "Cobra-3.5B"
    ldp = preset_config("cobra-3.5b-ldp")
    assert ldp.num_image_tokens == 196
    shapes = _shapes(_meta_model(ldp).model.connector)
    assert shapes["linear_2.weight"] == (2560, 8704) and shapes["position_conv.weight"] == (2560, 1, 3, 3)


def test_vl_mamba_preset_uses_siglip_vss_and_a_cross_scan():
    config = preset_config("vl-mamba")
    assert config.vision_config.model_type == "siglip_vision_model" and config.num_image_tokens == 729
    shapes = _shapes(_meta_model(config).model.connector)
    assert shapes["input_proj.weight"] == (2560, 1152)
    assert sum(name.endswith("A_log") for name in shapes) == 4  # four scan directions


@pytest.mark.parametrize("connector", ["mlp", "fused-mlp", "ldp", "msc", "vss-l2"])
@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_every_connector_and_lm_type_builds(connector, text):
    config = tiny_config(connector, text)
    model = MLMambaForConditionalGeneration(config)
    assert type(model.model.language_model).__name__ == {"mamba2": "Mamba2Model", "mamba": "MambaModel"}[text]
    assert config.get_text_config() is config.text_config


def test_vision_config_forms():
    single = MLMambaConfig(vision_config=SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"}),
                           text_config=text_config())
    assert single.vision_config.model_type == "siglip_vision_model"
    for vision in (CLIP, DINOV2_REG):
        assert MLMambaConfig(vision_config=vision, text_config=text_config()).num_image_tokens == 16
    fused = MLMambaConfig(vision_config=[DINOV2_REG, SIGLIP], text_config=text_config(), image_size=32)
    assert fused.vision_config.hidden_size == 24 + 32
    assert fused.vision_config.first_tower.model_type == "dinov2_with_registers"


def test_save_and_load_round_trip(tmp_path):
    config = tiny_config("msc", vision="fused", connector_scan="cross")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.vision_config.second_tower.model_type == "siglip_vision_model"
    assert set(loaded.auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(connector_type="qformer"), ValueError, "Unknown connector_type 'qformer'"),
    (dict(connector_scan="zigzag"), ValueError, "Unknown connector_scan 'zigzag'"),
    (dict(text_config=LlamaConfig()), ValueError, "`text_config` has model_type='llama'"),
    (dict(vision_config={"model_type": "llama"}), ValueError, "`vision_config` has model_type='llama'"),
    (dict(vision_config={"model_type": "siglip"}), ValueError, "pass the `.vision_config`"),
    (dict(vision_config={"hidden_size": 8}), ValueError, "model_type=None"),
    (dict(vision_config=[SIGLIP, SIGLIP, SIGLIP]), ValueError, "exactly two configs, got 3"),
    (dict(vision_config=42), TypeError, "must be a PreTrainedConfig or a dict"),
])
def test_bad_configs_are_rejected_clearly(kwargs, error, match):
    fields = dict(vision_config=SIGLIP, text_config=text_config())
    fields.update(kwargs)
    with pytest.raises(error, match=match):
        MLMambaConfig(**fields)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset 'ml-mamba-70b'"):
        preset_config("ml-mamba-70b")
