"""`ml-mamba-web MODEL`: a Gradio web demo (as the seed systems' demos and Hub Spaces use): upload an image, ask,
read the answer as it streams, keep talking.

    pip install "ml-mamba[web]"
    ml-mamba-web outputs/digits-demo --port 7860     # then open http://127.0.0.1:7860

Each browser tab has its own `ChatSession`: every turn continues from the state the previous one left. Generation
runs one request at a time (Gradio's queue).
"""

from __future__ import annotations

import argparse
import threading

from ml_mamba.serving.session import ChatSession, load_chat_model

TITLE = "ML-Mamba"


def respond(model, processor, message: str, image: str | None, history: list, session: ChatSession | None,
            max_new_tokens: int = 256):
    """One turn, as the UI runs it: yields ``(chat history, cleared textbox, image, session)`` while the answer
    streams. A turn with an image attaches it to that question; an empty message does nothing."""
    from transformers import TextIteratorStreamer

    session = session or ChatSession(model, processor)
    history = list(history or [])
    if not (message or "").strip():
        yield history, message, image, session
        return
    images = [image] if image else []
    history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure = {}

    def run():
        try:
            session.ask(message, images=images, streamer=streamer, max_new_tokens=max_new_tokens)
        except Exception as err:  # an unreadable image: shown in the chat, the conversation is kept
            failure["error"] = err
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    for piece in streamer:
        history[-1]["content"] += piece
        yield history, "", None, session
    thread.join()
    if "error" in failure:
        history[-1]["content"] = f"Error: {failure['error']}"
    yield history, "", None, session


def build_demo(model, processor, max_new_tokens: int = 256):
    """The Gradio Blocks app for ``model`` and ``processor``."""
    import gradio as gr

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nUpload an image, ask a question, and keep the conversation going.")
        session = gr.State(None)
        with gr.Row():
            image = gr.Image(type="filepath", label="Image", elem_id="image")
            chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
        message = gr.Textbox(label="Message", placeholder="Which digit is shown?", elem_id="message")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            reset = gr.Button("Reset", elem_id="reset")

        def turn(text, picture, history, state):
            yield from respond(model, processor, text, picture, history, state, max_new_tokens)

        outputs = [chatbot, message, image, session]
        send.click(turn, [message, image, chatbot, session], outputs)
        message.submit(turn, [message, image, chatbot, session], outputs)
        reset.click(lambda: ([], "", None, None), None, outputs)
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ml-mamba-web", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder or Hub repo id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    model, processor = load_chat_model(args.model, args.dtype)
    build_demo(model, processor, args.max_new_tokens).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
