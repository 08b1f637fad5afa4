"""MLMambaProcessor: <image> handling and expansion, the chat template, image conversion, fused-tower
normalisations, bad input, save/load. Budget: ~15 s."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, SiglipImageProcessor
from utils import chat, digit_images, tiny_config, tiny_processor, tokenizer

from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer
from modeling_ml_mamba import MLMambaProcessor

N = tiny_config().num_image_tokens  # 16 tokens per image for the tiny SigLIP (32 px, patch 8)


@pytest.fixture
def processor():
    return tiny_processor(tiny_config())


def test_adds_image_token_when_missing():
    plain = train_bpe_tokenizer(["hello world"] * 5, vocab_size=270, special_tokens=["<|endoftext|>"])
    assert "<image>" not in plain.get_vocab()
    before = len(plain)
    proc = MLMambaProcessor(image_processor=SiglipImageProcessor(), tokenizer=plain, num_image_tokens=4)
    assert proc.image_token == "<image>"
    assert proc.image_token_id == before == plain.convert_tokens_to_ids("<image>")
    ids = proc(text="a <image> b", images=digit_images(1))["input_ids"][0]
    assert ids.count(proc.image_token_id) == 4
    assert proc.tokenizer.padding_side == "left" and proc.tokenizer.pad_token == "<|endoftext|>"


def test_expands_each_placeholder(processor):
    out = processor(images=digit_images(3), text=["<image>one", "two <image> and <image>"], padding=True,
                    return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    counts = (out["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert counts == [N, 2 * N]


def test_default_chat_template_is_zephyr(processor):
    messages = chat(digit_images(1)[0], "Which digit is shown?") + [
        {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Even or odd?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|user|>\n<image>Which digit is shown?<|endoftext|>\n<|assistant|>\nSeven.<|endoftext|>\n"
                    "<|user|>\nEven or odd?<|endoftext|>\n<|assistant|>\n")


def test_chat_template_marks_only_the_answer_for_training(processor):
    messages = chat(digit_images(1)[0], "Which digit is shown?") + [{"role": "assistant", "content": "Seven."}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True)
    mask = out["assistant_masks"][0].bool()
    answer = processor.tokenizer.decode(out["input_ids"][0][mask])
    assert answer == "Seven.<|endoftext|>"
    assert not mask[out["input_ids"][0] == processor.image_token_id].any()


def test_apply_chat_template_with_image_gives_model_inputs(processor):
    out = processor.apply_chat_template(chat(digit_images(1)[0]), add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert set(out) >= {"input_ids", "attention_mask", "pixel_values"}
    assert int((out["input_ids"] == processor.image_token_id).sum()) == N


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA", "CMYK", "I;16", "1", "F"])
def test_non_rgb_images_are_converted(processor, mode):
    base = digit_images(1)[0]
    if mode in ("I;16", "F"):
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.float32) * 200).astype(
            np.uint16 if mode == "I;16" else np.float32))
    else:
        image = base.convert(mode)
    out = processor(images=[image], text=["<image>"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def test_transparent_pixels_become_white(processor):
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    pixels = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, torch.ones_like(pixels))  # white after SigLIP's 0.5/0.5 normalisation


def test_images_from_bytes_and_paths(processor, tmp_path):
    image = digit_images(1)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "digit.png")
    reference = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]
    for source in (buffer.getvalue(), str(tmp_path / "digit.png")):
        pixels = processor(images=[source], text=["<image>"], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, reference)


def test_corrupt_and_missing_images_give_clear_errors(processor, tmp_path):
    with pytest.raises(ValueError, match="image 1: the bytes could not be decoded"):
        processor(images=[digit_images(1)[0], b"not an image at all"], text=["<image><image>"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="image 0.*broken.png"):
        processor(images=[str(tmp_path / "broken.png")], text=["<image>"])
    with pytest.raises(ValueError, match="no image file"):
        processor(images=[str(tmp_path / "missing.png")], text=["<image>"])


def test_placeholder_counts_are_checked_per_sample_and_in_total(processor):
    images = digit_images(3)
    with pytest.raises(ValueError, match="Sample 1 has 1 <image> placeholder"):
        processor(images=[[images[0]], [images[1], images[2]]], text=["<image>a", "<image>b"])
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        processor(images=images[:2], text=["<image>a", "b"])
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=["<image>a"])
    with pytest.raises(ValueError, match="Found total 0 <image> tokens and 1 images"):
        processor(images=images[:1], text=["no placeholder here"])


def test_prompt_longer_than_the_maximum_is_rejected():
    processor = tiny_processor(tiny_config(), max_prompt_length=20)
    processor(images=digit_images(1), text=["<image>ok"])
    with pytest.raises(ValueError, match="Sample 1 is .* tokens long .* max_prompt_length=20"):
        processor(images=digit_images(2), text=["<image>ok", "<image>" + " seven" * 10], padding=True)


def test_processor_needs_to_know_the_image_token_count():
    processor = MLMambaProcessor(image_processor=SiglipImageProcessor(), tokenizer=tokenizer())
    with pytest.raises(ValueError, match="num_image_tokens=model.config.num_image_tokens"):
        processor(images=digit_images(1), text=["<image>"])


def test_fused_tower_gets_both_normalisations():
    processor = tiny_processor(tiny_config(vision="fused"))
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    pixels = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 6, 32, 32)
    rgb = torch.tensor([1.0, 0.0, 128 / 255])
    imagenet = (rgb - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :3, 0, 0], imagenet, atol=1e-2, rtol=0)
    torch.testing.assert_close(pixels[0, 3:, 0, 0], (rgb - 0.5) / 0.5, atol=1e-2, rtol=0)


def test_decode_helpers(processor):
    ids = processor.tokenizer("It is a seven.<|endoftext|>")["input_ids"]
    assert processor.batch_decode([ids], skip_special_tokens=True) == ["It is a seven."]
    assert processor.post_process_image_text_to_text(torch.tensor([ids])) == ["It is a seven."]


def test_save_and_load_round_trip(tmp_path):
    processor = tiny_processor(tiny_config(vision="fused"), max_prompt_length=500)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "MLMambaProcessor"
    assert (loaded.num_image_tokens, loaded.image_token_id, loaded.max_prompt_length) == (N, processor.image_token_id, 500)
    assert loaded.image_normalizations == processor.image_normalizations
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    image = digit_images(1)
    a = processor(images=image, text=["<image>seven"], return_tensors="pt")
    b = loaded(images=image, text=["<image>seven"], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
