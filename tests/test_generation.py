"""Generation through GenerationMixin: cached decode = full forward, batched left padding = one by one, beam search,
sampling, streaming, and pixel values used at prefill only. Budget: ~40 s."""

import functools
import threading

import pytest
import torch
from transformers import TextIteratorStreamer
from utils import chat, digit_images, tiny_model

LM_TYPES = ["mamba2", "mamba"]


def _inputs(processor, images, questions):
    texts = [processor.apply_chat_template(chat(image, q), add_generation_prompt=True, tokenize=False)
             for image, q in zip(images, questions)]
    flat = [image for image in images if image is not None]
    return processor(images=flat or None, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("text", LM_TYPES)
def test_step_by_step_decode_matches_full_forward(text):
    model, processor = tiny_model("msc", text)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(input_ids=out.sequences, pixel_values=inputs["pixel_values"]).logits
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, prompt_len - 1 + step], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("text", LM_TYPES)
def test_batched_left_padded_generation_equals_one_by_one(text):
    model, processor = tiny_model("msc", text, seed=1)
    images = digit_images(3) + [None]  # the last sample is text-only, mixed into the same batch
    questions = ["Which digit is shown?", "Is the digit even or odd? Answer in one word please.",
                 "Is it greater than four?", "Describe the picture in a few words."]
    batch = _inputs(processor, images, questions)
    assert processor.tokenizer.padding_side == "left"
    assert (batch["attention_mask"] == 0).any(), "the prompts should need padding"
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=8, do_sample=False)
        for index, (image, question) in enumerate(zip(images, questions)):
            single = _inputs(processor, [image], [question])
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)
            new_batched = batched[index, batch["input_ids"].shape[1]:]
            new_alone = alone[0, single["input_ids"].shape[1]:]
            assert new_batched.tolist() == new_alone.tolist(), f"sample {index} differs"


def test_cached_and_uncached_greedy_agree():
    model, processor = tiny_model("fused-mlp", "mamba2", seed=2)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_beam_search_scores_match_full_forward():
    model, processor = tiny_model("msc", "mamba2", seed=3)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                             length_penalty=0.0, early_stopping=True, output_scores=True,
                             return_dict_in_generate=True, min_new_tokens=5)
        assert out.sequences.shape[0] == 3
        # Each returned beam's score is the sum of its tokens' log-probs under a fresh full forward: this fails if
        # the recurrent cache were not reordered correctly between beams.
        for sequence, score in zip(out.sequences, out.sequences_scores):
            logits = model(input_ids=sequence[None], pixel_values=inputs["pixel_values"]).logits[0]
            logprobs = torch.log_softmax(logits[prompt_len - 1:-1], dim=-1)
            total = logprobs.gather(-1, sequence[prompt_len:, None]).sum()
            torch.testing.assert_close(total, score, atol=1e-3, rtol=1e-4)


def test_sampling_is_seeded_and_varies():
    model, processor = tiny_model("mlp", "mamba2", seed=4)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.5).tolist())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_streaming_yields_the_generated_text():
    model, processor = tiny_model("msc", "mamba2", seed=5)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate,
                              kwargs=dict(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = processor.decode(reference[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert streamed == expected


def test_pixel_values_reach_the_model_only_at_prefill():
    model, processor = tiny_model("msc", "mamba2", seed=6)
    inputs = _inputs(processor, digit_images(1), ["Which digit is shown?"])
    seen = []
    original = model.forward

    @functools.wraps(original)  # generate checks its kwargs against forward's signature
    def spy(*args, **kwargs):
        seen.append((kwargs.get("pixel_values") is not None, kwargs["input_ids"].shape[1]))
        return original(*args, **kwargs)

    model.forward = spy
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert seen[0] == (True, inputs["input_ids"].shape[1])
    assert all(step == (False, 1) for step in seen[1:]) and len(seen) == 4
