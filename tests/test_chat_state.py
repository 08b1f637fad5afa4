"""Multi-turn chat on the recurrent state: continuing from a returned cache (or one saved to disk and loaded again)
processes only the tokens the state has not seen, and equals a full re-prefill of the whole chat (greedy tokens
identical, logits to float tolerance), for Mamba-2 and Mamba-1, with images in the first and in a later turn."""

import pytest
import torch
from utils import digit_images, tiny_model

from modeling_ml_mamba.ml_mamba_compat import CACHE_NAME, GENERATE_CACHE_NAME, cache_token_count
from modeling_ml_mamba.ml_mamba_state import load_state, save_state
from ml_mamba.serving.session import ChatSession, StateStore, continues

GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def _needs_token_count(cache):
    if cache_token_count(cache) is None:
        pytest.skip("this transformers release keeps no token count on recurrent caches (5.25+ does)")


def _first_turn(model, processor):
    chat = [{"role": "user", "content": [{"type": "image", "image": digit_images(1)[0]},
                                         {"type": "text", "text": "Which digit is shown?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, **GREEDY)
    return inputs, out


def _next_turn(processor, inputs, sequences, text="Is it odd? Say yes or no."):
    """The whole chat so far plus a new user message, as ids (what a template renders, minus tokenization quirks)."""
    more = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    ids = torch.cat([sequences, more], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"]}


def _fed_lengths(model):
    """Record, per call of the inner model, how many tokens it was given and whether images came with them."""
    calls = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("pixel_values"))),
        with_kwargs=True)
    return calls, hook


def _assert_same_generation(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("text", ["mamba2", "mamba"])
def test_continuing_from_the_returned_cache_equals_reprefilling(text):
    model, processor = tiny_model("mlp", text=text, seed=1)
    inputs, first = _first_turn(model, processor)
    cache = getattr(first, GENERATE_CACHE_NAME)
    _needs_token_count(cache)
    seen = first.sequences.shape[1] - 1  # the last new token was sampled, never fed
    assert cache_token_count(cache) == seen
    second = _next_turn(processor, inputs, first.sequences)
    expected = model.generate(**second, **GREEDY)
    calls, hook = _fed_lengths(model)
    got = model.generate(**second, **GREEDY, **{GENERATE_CACHE_NAME: cache})
    hook.remove()
    _assert_same_generation(got, expected)
    fed, pixel_values = calls[0]
    assert fed == second["input_ids"].shape[1] - seen and pixel_values is None  # only the unseen tokens, no image


def test_continuing_from_a_state_saved_to_disk_equals_reprefilling(tmp_path):
    model, processor = tiny_model("mlp", text="mamba2", seed=2)
    inputs, first = _first_turn(model, processor)
    _needs_token_count(getattr(first, GENERATE_CACHE_NAME))
    path = tmp_path / "chat.safetensors"
    save_state(getattr(first, GENERATE_CACHE_NAME), path, token_ids=first.sequences[0, :-1])
    second = _next_turn(processor, inputs, first.sequences)
    expected = model.generate(**second, **GREEDY)
    fresh, _ = tiny_model("mlp", text="mamba2", seed=2)  # another process's copy of the model, as after a restart
    cache, seen = load_state(path, fresh)
    assert torch.equal(seen, first.sequences[0, :-1]) and continues(seen, second["input_ids"][0], cache)
    _assert_same_generation(fresh.generate(**second, **GREEDY, **{GENERATE_CACHE_NAME: cache}), expected)


def test_a_later_turn_with_a_new_image_feeds_only_that_image():
    model, processor = tiny_model("mlp", text="mamba2", seed=3)
    first, second = digit_images(2)
    chat = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Which?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]
    earlier = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    chat.append({"role": "user", "content": [{"type": "image", "image": second}, {"type": "text", "text": "And?"}]})
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    length = earlier["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][:, :length], earlier["input_ids"])  # the template renders turn by turn
    with torch.no_grad():
        cache = getattr(model(**earlier, use_cache=True), CACHE_NAME)
    _needs_token_count(cache)
    expected = model.generate(**inputs, **GREEDY)
    calls, hook = _fed_lengths(model)
    got = model.generate(**inputs, **GREEDY, **{GENERATE_CACHE_NAME: cache})
    hook.remove()
    _assert_same_generation(got, expected)
    fed, pixel_values = calls[0]
    assert fed == inputs["input_ids"].shape[1] - length
    torch.testing.assert_close(pixel_values, inputs["pixel_values"][1:])  # the second image only


def test_a_cut_inside_an_image_is_refused():
    from modeling_ml_mamba.modeling_ml_mamba import _unseen_images

    ids = torch.tensor([[1, 9, 9, 9, 9, 2, 9, 9, 9, 9, 3]])
    pixels = torch.zeros(2, 3, 4, 4)
    assert _unseen_images(pixels, ids, 5, image_token_id=9, tokens_per_image=4).shape[0] == 1
    assert _unseen_images(pixels, ids, 10, image_token_id=9, tokens_per_image=4) is None
    with pytest.raises(ValueError, match="has seen 2 of the 4 tokens of an image"):
        _unseen_images(pixels, ids, 3, image_token_id=9, tokens_per_image=4)


def test_state_store_hands_out_copies_of_the_longest_prefix():
    model, processor = tiny_model("mlp", text="mamba2", seed=1)
    _, first = _first_turn(model, processor)
    cache = getattr(first, GENERATE_CACHE_NAME)
    _needs_token_count(cache)
    store = StateStore(capacity=2)
    seen = first.sequences[0, :-1]
    store.put(seen, cache)
    taken, length = store.take(torch.cat([seen, torch.tensor([5, 6])]))
    assert length == len(seen) and taken is not cache
    assert torch.equal(taken.get_recurrent_state(0), cache.get_recurrent_state(0))
    assert store.take(torch.cat([seen[:-1], torch.tensor([7, 7, 7])])) == (None, 0)  # not a continuation
    assert store.take(seen) == (None, 0)  # nothing new to process


def test_chat_session_on_the_trained_demo_continues_and_answers_as_reprefilling(trained_demo, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(trained_demo).eval()
    processor = AutoProcessor.from_pretrained(trained_demo)
    image_path = tmp_path / "digit.png"
    digit_images(1, start=7)[0].save(image_path)
    questions = [("Which digit is shown?", [str(image_path)]), ("Is the digit even or odd?", []),
                 ("Which digit is shown?", [])]
    continued, reference = ChatSession(model, processor), ChatSession(model, processor, reuse_state=False)
    for turn, (question, images) in enumerate(questions):
        answer = continued.ask(question, images=images, max_new_tokens=8)
        assert answer == reference.ask(question, images=images, max_new_tokens=8)
        if turn and cache_token_count(continued.cache) is not None:
            last = continued.last_turn
            assert last["continued"] and last["processed_tokens"] < last["prompt_tokens"] // 2, last
    continued.save(tmp_path / "chat.safetensors")
    restored = ChatSession.load(tmp_path / "chat.safetensors", model, processor)
    assert restored.messages == continued.messages
    assert restored.ask("Is the digit even or odd?", max_new_tokens=8) == \
        reference.ask("Is the digit even or odd?", max_new_tokens=8)
    if cache_token_count(restored.cache) is not None:
        assert restored.last_turn["continued"]
