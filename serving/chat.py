"""`ml-mamba-chat MODEL`: talk to a model in the terminal, answers streamed as they are generated.

    ml-mamba-chat outputs/digits-demo
    > /image digit.png
    > Which digit is shown?
    3
    > Is the digit even or odd?
    odd

Each turn continues from the state the previous one left (`ChatSession`): it costs its own tokens, not the whole
history. Commands: ``/image PATH_OR_URL`` attaches an image to the next message, ``/reset`` starts over,
``/save FILE`` and ``/load FILE`` keep a conversation (state and messages) on disk, ``/quit`` ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from transformers import TextStreamer

from ml_mamba.serving.session import ChatSession, load_chat_model

HELP = ("Type a message and press Enter. /image PATH_OR_URL attaches an image to your next message; /reset starts "
        "over; /save FILE, /load FILE keep the conversation; /quit ends.")


class _Printer(TextStreamer):
    """transformers' `TextStreamer`, writing to ``output`` instead of print()."""

    def __init__(self, tokenizer, output):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.output = output

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.output.write(text + ("\n" if stream_end else ""))
        self.output.flush()


def _readable(image: str) -> bool:
    return image.startswith(("http://", "https://", "data:")) or os.path.isfile(image.removeprefix("file://"))


def run_chat(session: ChatSession, read=input, output=sys.stdout, show_stats: bool = False, **generate_kwargs):
    """The chat loop over ``read`` (a prompt -> line function; EOF ends it) and ``output``; returns the session
    (a new one after ``/load``)."""
    output.write(HELP + "\n")
    images: list[str] = []
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return session
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if not line:
            continue
        if command in ("/quit", "/exit"):
            return session
        if command == "/reset":
            session.reset()
            images.clear()
            output.write("(conversation reset)\n")
        elif command == "/image":
            if not argument or not _readable(argument):
                output.write(f"error: /image needs an existing image file or an http(s)/data URL, got {argument!r}\n")
            else:
                images.append(argument)
                output.write(f"(image attached to your next message: {argument})\n")
        elif command in ("/save", "/load"):
            if not argument:
                output.write(f"error: {command} needs a file name\n")
                continue
            try:
                if command == "/save":
                    session.save(argument)
                else:
                    session = ChatSession.load(argument, session.model, session.processor)
                output.write(f"({'saved to' if command == '/save' else 'loaded'} {argument})\n")
            except (OSError, ValueError) as err:
                output.write(f"error: {err}\n")
        elif command.startswith("/"):
            output.write(f"error: unknown command {command!r}. {HELP}\n")
        else:
            started = time.perf_counter()
            try:
                session.ask(line, images=images, streamer=_Printer(session.processor.tokenizer, output),
                            **generate_kwargs)
            except (OSError, ValueError) as err:  # e.g. an unreadable image: the conversation is kept as it was
                output.write(f"error: {err}\n")
                continue
            finally:
                images = []
            if show_stats:
                turn = session.last_turn
                output.write(f"[{turn['processed_tokens']} of {turn['prompt_tokens']} prompt tokens processed, "
                             f"{turn['new_tokens']} new, {time.perf_counter() - started:.2f} s]\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ml-mamba-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder or Hub repo id")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--stats", action="store_true", help="print tokens processed and time after each answer")
    args = parser.parse_args(argv)
    model, processor = load_chat_model(args.model, args.dtype)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    run_chat(ChatSession(model, processor, system=args.system), show_stats=args.stats,
             max_new_tokens=args.max_new_tokens, **sampling)


if __name__ == "__main__":
    main()
