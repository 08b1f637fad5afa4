"""`ml-mamba-serve`'s OpenAI-compatible API, driven by the official `openai` client against 127.0.0.1: non-streamed and
streamed answers equal `generate`'s greedy output for the same chat, a data-URL image, the model list, and bad
requests answered with a 4xx naming the problem while the server keeps serving."""

import base64
import contextlib
import io
import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn
from utils import digit_images, tiny_model

from ml_mamba.serving import ChatService, build_app

MODEL_ID = "tiny-ml-mamba"


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def _serving(service):
    """``service`` on a free port of 127.0.0.1, and an official OpenAI client for it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    model, processor = tiny_model("mlp")
    service = ChatService(model, processor, MODEL_ID, limits={"max_images": 2, "max_prompt_tokens": 64})
    with _serving(service) as client:
        yield client, model, processor


def _expected(model, processor, image, question, max_new_tokens=6):
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _messages(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                         {"type": "text", "text": question}]}]


def test_answers_equal_greedy_generate_streamed_and_not(server):
    client, model, processor = server
    image = digit_images(1)[0]
    expected = _expected(model, processor, image, "Which digit is shown?")
    reply = client.chat.completions.create(model=MODEL_ID, messages=_messages(image, "Which digit is shown?"),
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= 6 and reply.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL_ID, messages=_messages(image, "Which digit is shown?"),
                                            max_tokens=6, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == expected
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


@pytest.mark.parametrize("messages, status, words", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                   {"type": "text", "text": "Which digit?"}]}], 400, "image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}],
     400, "at most 2"),
    ([{"role": "user", "content": "Which digit? " * 40}], 400, "at most 64"),
    ([{"role": "robot", "content": "hi"}], 400, "role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/digit.png"}},
                                   {"type": "text", "text": "Which digit?"}]}], 400, "image"),  # unreachable URL
])
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, messages, status, words):
    client, model, processor = server
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4)
    assert caught.value.status_code == status and words in str(caught.value)
    good = client.chat.completions.create(model=MODEL_ID, messages=_messages(digit_images(1)[0], "Odd?"),
                                          max_tokens=3, temperature=0)
    assert isinstance(good.choices[0].message.content, str)


def test_unknown_model_is_a_404(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_the_next_turn_continues_from_the_saved_state(trained_demo):
    """A chat's second request (the whole history, as OpenAI clients send it) processes only its new tokens, reported
    as cached prompt tokens, and answers as a full re-prefill of the chat does."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ml_mamba.serving.session import ChatSession
    from modeling_ml_mamba.ml_mamba_compat import cache_token_count

    model = AutoModelForImageTextToText.from_pretrained(trained_demo).eval()
    processor = AutoProcessor.from_pretrained(trained_demo)
    image = digit_images(1, start=3)[0]
    reference = ChatSession(model, processor, reuse_state=False)
    with _serving(ChatService(model, processor, MODEL_ID)) as client:
        messages = _messages(image, "Which digit is shown?")
        first = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
        assert first.choices[0].message.content == reference.ask("Which digit is shown?", [_data_url(image)],
                                                                  max_new_tokens=8)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Is the digit even or odd?"}]
        second = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert second.choices[0].message.content == reference.ask("Is the digit even or odd?", max_new_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    if cache_token_count(reference.cache) is not None:  # transformers 5.25+: generate can continue a state
        assert second.usage.prompt_tokens // 2 < cached < second.usage.prompt_tokens


def test_the_ml_mamba_serve_command_answers_as_the_readme_shows(trained_demo):
    """`ml-mamba-serve MODEL --port P` started as a user starts it (its own process), asked by the openai client."""
    import os
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ml_mamba.serving.server", trained_demo, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                model_id = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        reply = client.chat.completions.create(model=model_id, messages=_messages(digit_images(1, start=4)[0],
                                                                                  "Which digit is shown?"),
                                               max_tokens=8, temperature=0)
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        assert reply.choices[0].message.content == words[int(load_digits().target[4])]
    finally:
        server.terminate()
        server.wait(timeout=30)
