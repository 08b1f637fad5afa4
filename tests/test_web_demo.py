"""The Gradio web demo (`ml-mamba-web`) on the trained digits demo: the turn handler streams the answer, continues
the conversation on the saved state and survives a bad image; and, in a real headless browser (Debian's chromium
driven by Playwright; `scripts/browser_test.sh` installs both and runs it), a user uploads a digit, asks which digit
it is and reads the right answer."""

import os
import shutil
import socket

import pytest
from utils import digit_images

gradio = pytest.importorskip("gradio", reason="the web demo is the optional extra ml-mamba[web]")

from ml_mamba.serving.session import ChatSession  # noqa: E402
from ml_mamba.serving.web_demo import build_demo, respond  # noqa: E402
from modeling_ml_mamba.ml_mamba_compat import cache_token_count  # noqa: E402

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _digit_file(tmp_path, index=7):
    from sklearn.datasets import load_digits

    path = tmp_path / f"digit_{index}.png"
    digit_images(1, start=index)[0].save(path)
    return str(path), NUMBER_WORDS[int(load_digits().target[index])]


def test_turn_handler_streams_and_continues_the_conversation(trained_demo, tmp_path):
    model, processor = _load(trained_demo)
    image, _ = _digit_file(tmp_path)
    reference = ChatSession(model, processor, reuse_state=False)
    updates = list(respond(model, processor, "Which digit is shown?", image, [], None, max_new_tokens=8))
    history, textbox, picture, session = updates[-1]
    assert len(updates) >= 3 and textbox == "" and picture is None  # streamed; the box and image are cleared
    expected = reference.ask("Which digit is shown?", [image], max_new_tokens=8)
    assert history == [{"role": "user", "content": "Which digit is shown?"},
                       {"role": "assistant", "content": expected}]
    history, _, _, session = list(respond(model, processor, "Is the digit even or odd?", None, history, session,
                                          max_new_tokens=8))[-1]
    assert history[-1]["content"] == reference.ask("Is the digit even or odd?", max_new_tokens=8)
    if cache_token_count(session.cache) is not None:
        assert session.last_turn["continued"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    history, _, _, session = list(respond(model, processor, "And this?", str(broken), history, session))[-1]
    assert history[-1]["content"].startswith("Error:") and len(session.messages) == 4  # nothing lost
    assert isinstance(build_demo(model, processor), gradio.Blocks)


@pytest.mark.browser
@pytest.mark.skipif(os.environ.get("ML_MAMBA_BROWSER_TESTS") != "1",
                    reason="browser test: run scripts/browser_test.sh (installs chromium and playwright)")
def test_web_demo_in_a_headless_browser_reads_the_right_digit(trained_demo, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    model, processor = _load(trained_demo)
    image, answer = _digit_file(tmp_path, index=13)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_demo(model, processor, max_new_tokens=8).queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                                 headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#image input[type=file]").set_input_files(image)
            page.locator("#image img").first.wait_for(timeout=30_000)  # the upload shows its preview
            page.locator("#message textarea").fill("Which digit is shown?")
            page.locator("#send").click()
            bot = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']").last
            expect(bot).to_contain_text(answer, timeout=120_000)
            assert bot.inner_text().strip() == answer
            browser.close()
    finally:
        demo.close()
