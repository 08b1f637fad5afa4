"""`ml-mamba-chat`: the terminal chat on the trained digits demo, as a user types it: an image attached with
`/image`, answers streamed and equal to a full re-prefill of the chat, later turns continued from the saved state,
bad commands answered without losing the conversation, `/save` + `/load`, and the installed command itself."""

import io
import os
import subprocess
import sys

from utils import digit_images

from ml_mamba.serving.chat import run_chat
from ml_mamba.serving.session import ChatSession
from modeling_ml_mamba.ml_mamba_compat import cache_token_count


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_terminal_chat_streams_continues_and_keeps_the_conversation(trained_demo, tmp_path):
    model, processor = _load(trained_demo)
    image = tmp_path / "digit.png"
    digit_images(1, start=5)[0].save(image)
    reference = ChatSession(model, processor, reuse_state=False)
    expected = [reference.ask("Which digit is shown?", [str(image)], max_new_tokens=8),
                reference.ask("Is the digit even or odd?", max_new_tokens=8),
                reference.ask("Which digit is shown?", max_new_tokens=8)]
    saved = tmp_path / "chat.safetensors"
    lines = iter(["/image /no/such/file.png", f"/image {image}", "Which digit is shown?", "/frobnicate",
                  "Is the digit even or odd?", f"/save {saved}", "/reset", f"/load {saved}", "Which digit is shown?",
                  "/quit", "never read"])
    output = io.StringIO()
    session = run_chat(ChatSession(model, processor), read=lambda prompt: next(lines), output=output,
                       show_stats=True, max_new_tokens=8)
    text = output.getvalue()
    assert "error: /image needs an existing image file" in text and "unknown command '/frobnicate'" in text
    answers = [line for line in text.splitlines() if line and not line.startswith(("(", "[", "error", "Type"))]
    assert answers == expected  # streamed piece by piece, one line per answer
    assert os.path.exists(saved) and next(lines) == "never read"
    assert len(session.messages) == 6  # three questions and answers, the last continued after /load
    if cache_token_count(session.cache) is not None:
        assert session.last_turn["continued"]


def test_the_ml_mamba_chat_command_reads_stdin(trained_demo, tmp_path):
    image = tmp_path / "digit.png"
    digit_images(1, start=2)[0].save(image)
    result = subprocess.run([sys.executable, "-m", "ml_mamba.serving.chat", trained_demo, "--stats",
                             "--max-new-tokens", "8"], input=f"/image {image}\nWhich digit is shown?\n", text=True,
                            capture_output=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prompt tokens processed" in result.stdout and "image attached" in result.stdout
