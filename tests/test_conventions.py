"""transformers' model conventions and the inputs real clients send: data-URL / base64 / file:// images, the string
`attn_implementation`, `return_dict=False` (see test_modeling), the vision-language `get_image_features` (see
test_modeling), the fused vision sub-config in `AutoConfig`, deprecated cache names, SigLIP towers without their
unused head, and one call that builds the processor matching a config."""

import base64
import copy
import io
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline
from utils import chat, digit_images, tiny_config, tiny_model, tokenizer

from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor, preset_config
from modeling_ml_mamba import ml_mamba_compat
from modeling_ml_mamba.configuration_ml_mamba import MLMambaFusedVisionConfig


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, processor = tiny_model("mlp")
    folder = tmp_path_factory.mktemp("conventions")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), model, processor


def test_images_as_data_urls_base64_and_file_urls(saved, tmp_path):
    _, model, processor = saved
    image = digit_images(1)[0]
    expected = processor(images=[image], text=["<image>Which digit?"], return_tensors="pt")["pixel_values"]
    path = tmp_path / "a digit.png"
    image.save(path)
    url = _data_url(image)
    for source in (url, url.split(",", 1)[1], "file://" + str(path).replace(" ", "%20")):
        pixels = processor(images=[source], text=["<image>Which digit?"], return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels, expected), source[:30]
    # a chat with an image URL item, as the openai client sends it
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "Which digit?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], expected)


@pytest.mark.parametrize("bad, message", [
    ("data:image/png;base64,@@not-base64@@", "sample 0, image 1 .*base64 image data could not be decoded"),
    ("data:text/plain,hello", "sample 0, image 1: malformed data URL"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
     "sample 0, image 1 .*decoded as an image"),
    ("/no/such/file.png", "sample 0, image 1: no image file at '/no/such/file.png'"),
])
def test_malformed_image_strings_name_the_sample_and_image(saved, bad, message):
    _, _, processor = saved
    with pytest.raises(ValueError, match=message):
        processor(images=[[digit_images(1)[0], bad]], text=["<image><image>Which digits?"], return_tensors="pt")


def test_pipeline_answers_a_data_url_image(saved):
    folder, model, processor = saved
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = digit_images(1)[0]
    by_url = [{"role": "user", "content": [{"type": "image", "url": _data_url(image)},
                                           {"type": "text", "text": "Which digit is shown?"}]}]
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    assert pipe(text=by_url, **kwargs)[0]["generated_text"] == pipe(text=chat(image), **kwargs)[0]["generated_text"]


def test_attn_implementation_string_reaches_the_vision_tower_only(saved):
    folder, model, processor = saved
    inputs = processor(images=digit_images(1), text=["<image>Which digit?"], return_tensors="pt")
    for requested in ("sdpa", "eager", {"vision_config": "sdpa", "text_config": "eager"}):
        loaded = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=requested).eval()
        vision = loaded.model.vision_tower.model.config._attn_implementation
        assert vision == (requested if isinstance(requested, str) else "sdpa")
        assert loaded.model.language_model.config._attn_implementation == "eager"
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_fused_vision_config_is_an_auto_config(tmp_path):
    assert isinstance(AutoConfig.for_model("ml_mamba_fused_vision"), MLMambaFusedVisionConfig)
    vision = tiny_config("fused-mlp", vision="fused").vision_config
    vision.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, MLMambaFusedVisionConfig)
    assert reloaded.first_tower.to_dict() == vision.first_tower.to_dict()
    assert reloaded.second_tower.hidden_size == vision.second_tower.hidden_size


def test_deprecated_cache_names_work_and_warn(saved):
    _, model, processor = saved
    inputs = processor(images=digit_images(1), text=["<image>Which digit?"], return_tensors="pt")
    by_name = {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = model(**inputs, use_cache=True)
        next_token = first.logits[:, -1:].argmax(-1)
        for name in ("cache", "cache_params", "past_key_values"):
            prefilled = model(**inputs, use_cache=True)
            by_name[name] = model(input_ids=next_token, use_cache=True,
                                  **{name: getattr(prefilled, ml_mamba_compat.CACHE_NAME)}).logits
    assert torch.equal(by_name["cache"], by_name["cache_params"])
    assert torch.equal(by_name["cache"], by_name["past_key_values"])
    messages = {str(w.message) for w in caught
                if issubclass(w.category, FutureWarning) and "deprecated" in str(w.message)}
    deprecated = {"cache", "cache_params", "past_key_values"} - {ml_mamba_compat.CACHE_NAME}
    assert {m.split("`")[1] for m in messages} == deprecated
    assert all(f"pass the recurrent cache as `{ml_mamba_compat.CACHE_NAME}`" in m for m in messages)


def test_siglip_towers_drop_the_unused_head_unless_asked():
    plain = MLMambaForConditionalGeneration(tiny_config("mlp"))
    assert not any(".head." in name for name, _ in plain.named_parameters())
    vision = dict(tiny_config("mlp").vision_config.to_dict(), vision_use_head=True)
    with_head = MLMambaForConditionalGeneration(tiny_config("mlp", vision_config=vision))
    assert any(".head." in name for name, _ in with_head.named_parameters())
    assert MLMambaConfig().vision_config.second_tower.vision_use_head is False  # the published fused tower


def test_processor_for_a_config_in_one_call(tmp_path):
    tok = tokenizer()
    config = preset_config("tiny", tokenizer=tok, image_size=32,
                           vision_config=tiny_config("mlp").vision_config.to_dict(),
                           text_config=tiny_config("mlp").text_config.to_dict())
    processor = MLMambaProcessor.from_config(config, tok)
    assert config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert processor.num_image_tokens == config.num_image_tokens
    assert config.text_config.vocab_size >= len(tok)
    model = MLMambaForConditionalGeneration(config).eval()
    inputs = processor.apply_chat_template(chat(digit_images(1)[0]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).num_image_tokens == config.num_image_tokens

    config.image_token_id = 3
    with pytest.raises(ValueError, match="config.image_token_id is 3 but the tokenizer's <image> is"):
        MLMambaProcessor.from_config(config, tok)
    small = preset_config("tiny", image_size=32, vision_config=tiny_config("mlp").vision_config.to_dict(),
                          text_config=dict(tiny_config("mlp").text_config.to_dict(), vocab_size=64))
    small.image_token_id = None
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens .* vocabulary is 64"):
        MLMambaProcessor.from_config(small, tok)


@pytest.mark.parametrize("connector, vision", [("mlp", "siglip"), ("ldp", "clip"), ("msc", "dinov2"),
                                               ("fused-mlp", "fused")])
def test_exactly_the_parameters_without_a_gradient_are_frozen(connector, vision):
    """The vision layers after `vision_feature_layer`, final norms and DINOv2's mask token never reach the loss: they
    are frozen at construction (DDP without find_unused_parameters refuses gradient-less parameters), and nothing
    else is."""
    model, processor = tiny_model(connector, vision=vision)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.{name}" for name in model.model.unused_vision_parameter_names()} and frozen
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    inputs = processor(images=digit_images(2), text=["<image>Which digit?", "<image>Odd?"], padding=True,
                       return_tensors="pt")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    without_gradient = {name for name, p in model.named_parameters() if p.grad is None}
    assert without_gradient == frozen


@pytest.mark.parametrize("connector, text, vision", [("mlp", "mamba2", "siglip"), ("msc", "mamba", "fused")])
def test_missing_weights_are_initialised_as_in_a_fresh_model(monkeypatch, connector, text, vision):
    """`from_pretrained` with weights missing (built on the meta device, then `_init_weights`) gives the same values
    as `__init__` under the same seed, the SigLIP attention and MLP layers included (transformers' own check)."""
    from transformers import PreTrainedModel, set_seed

    original = PreTrainedModel._initialize_weights

    def seeded(*args, **kwargs):
        set_seed(42)
        return original(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    config = tiny_config(connector, text, vision)
    fresh = MLMambaForConditionalGeneration(copy.deepcopy(config)).state_dict()
    loaded = MLMambaForConditionalGeneration.from_pretrained(None, config=copy.deepcopy(config),
                                                             state_dict={}).state_dict()
    assert sorted(fresh) == sorted(loaded)
    assert [key for key in fresh if not torch.equal(fresh[key], loaded[key])] == []
