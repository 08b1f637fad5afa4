"""`ml-mamba-serve MODEL`: an OpenAI-compatible chat server for ML-Mamba models (and any image-text-to-text model).

    ml-mamba-serve outputs/digits-demo --port 8000
    # then, with the official client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(model=..., messages=...)

A thin layer over transformers' own pieces: the processor's chat template, `generate` and `TextIteratorStreamer`,
served by FastAPI/uvicorn. `POST /v1/chat/completions` (``stream`` as server-sent events, ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``) and `GET /v1/models`. Images come as ``image_url`` content parts
(data URLs, http(s) URLs, paths). Requests are queued: one generation runs at a time (a lock), the others wait.
The next turn of a chat continues from the state the previous turn left (the last few are kept, `--saved-states`):
it processes only its own new tokens, reported as ``usage.prompt_tokens_details.cached_tokens``. Bad input gets a
4xx JSON error in OpenAI's shape naming the problem, and the server keeps serving.
"""

import argparse
import json
import threading
import time
import uuid

import torch

from ml_mamba.serving.session import StateStore, generate_turn, load_chat_model

DEFAULT_LIMITS = {"max_images": 8, "max_prompt_tokens": 8192, "max_new_tokens": 1024, "max_body_bytes": 20 * 2**20,
                  "saved_states": 4}


class RequestError(Exception):
    """A client error: HTTP ``status`` with OpenAI's error body (``message``, ``param``, ``code``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def to_chat(messages, max_images: int) -> list[dict]:
    """OpenAI messages -> the processor's chat format; ``image_url`` parts become ``{"type": "image", "url": ...}``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` must be a non-empty list of {role, content} objects.", "messages")
    chat, images = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{index}] needs a role of system, user or assistant.",
                               f"messages[{index}].role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for part_index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise RequestError(400, f"messages[{index}].content[{part_index}]: image_url needs a url.",
                                           f"messages[{index}].content[{part_index}].image_url")
                    parts.append({"type": "image", "url": url})
                    images += 1
                else:
                    raise RequestError(400, f"messages[{index}].content[{part_index}]: unsupported part type "
                                            f"{kind!r} (expected 'text' or 'image_url').",
                                       f"messages[{index}].content[{part_index}].type")
        else:
            raise RequestError(400, f"messages[{index}].content must be a string or a list of parts.",
                               f"messages[{index}].content")
        chat.append({"role": message["role"], "content": parts})
    if images > max_images:
        raise RequestError(400, f"The request has {images} images; this server takes at most {max_images}.",
                           "messages", "too_many_images")
    return chat


class ChatService:
    """The model, its processor and the limits; `prepare` checks a request, `generate` runs it (one at a time)."""

    def __init__(self, model, processor, model_id: str, limits: dict | None = None):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.lock = threading.Lock()
        self.states = StateStore(self.limits["saved_states"])

    def prepare(self, request: dict) -> tuple[dict, dict]:
        """(model inputs, generate kwargs) for an OpenAI chat request, or a `RequestError`."""
        if request.get("model") not in (None, self.model_id):
            raise RequestError(404, f"The model {request.get('model')!r} does not exist here; this server serves "
                                    f"{self.model_id!r} (GET /v1/models).", "model", "model_not_found")
        chat = to_chat(request.get("messages"), self.limits["max_images"])
        try:
            inputs = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
        except (ValueError, OSError, TypeError) as err:  # unreadable, malformed or unreachable images
            raise RequestError(400, f"Could not read the request's images: {err}", "messages", "invalid_image")
        except Exception as err:  # e.g. an http(s) image while offline
            raise RequestError(400, f"Could not load the request's images: {err}", "messages", "invalid_image")
        length = inputs["input_ids"].shape[1]
        if length > self.limits["max_prompt_tokens"]:
            raise RequestError(400, f"The prompt is {length} tokens (image tokens included); this server takes at "
                                    f"most {self.limits['max_prompt_tokens']}.", "messages", "context_length_exceeded")
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens")) or 256
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.limits["max_new_tokens"]:
            raise RequestError(400, f"max_tokens must be an integer from 1 to {self.limits['max_new_tokens']}, got "
                                    f"{max_tokens!r}.", "max_tokens")
        temperature = request.get("temperature", 1.0)
        top_p = request.get("top_p", 1.0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not isinstance(value, (int, float)) or value < 0 or (name == "top_p" and value > 1):
                raise RequestError(400, f"{name} must be a number ({'0-2' if name == 'temperature' else '0-1'}), "
                                        f"got {value!r}.", name)
        stop = request.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        kwargs = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=float(temperature), top_p=float(top_p))
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.processor.tokenizer)
        return inputs, {"seed": request.get("seed"), **kwargs}

    def generate(self, inputs: dict, kwargs: dict, streamer=None) -> tuple[str, int, str, int]:
        """(text, completion tokens, finish reason, prompt tokens read from a saved state); runs under the lock.

        A request whose prompt starts with the tokens a stored state has seen (the same chat, one turn on) continues
        from that state and processes only the rest (`StateStore`); the answer is the same as a full prefill."""
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(int(seed))
            cache, cached = self.states.take(inputs["input_ids"][0])
            new, cache, seen = generate_turn(self.model, inputs.to(self.model.device), cache, streamer, **kwargs)
            self.states.put(seen, cache)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        finish = "stop" if (new.numel() < kwargs["max_new_tokens"] or (len(new) and int(new[-1]) in eos)) \
            else "length"
        return self.processor.decode(new, skip_special_tokens=True), int(new.numel()), finish, cached


def build_app(service: ChatService):
    """The FastAPI application serving ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import TextIteratorStreamer

    app = FastAPI(title="ml-mamba-serve")

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "ml-mamba"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()
        if len(body) > service.limits["max_body_bytes"]:
            raise RequestError(413, f"The request body is {len(body)} bytes; this server takes at most "
                                    f"{service.limits['max_body_bytes']}.", None, "request_too_large")
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as err:
            raise RequestError(400, f"The request body is not JSON: {err}.") from None
        inputs, kwargs = service.prepare(payload)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if not payload.get("stream"):
            import anyio

            text, count, finish, cached = await anyio.to_thread.run_sync(service.generate, inputs, kwargs)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": service.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                              "total_tokens": prompt_tokens + count,
                              "prompt_tokens_details": {"cached_tokens": cached}}}

        streamer = TextIteratorStreamer(service.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        result = {}

        def run():
            try:
                result.update(zip(("text", "count", "finish", "cached"), service.generate(inputs, kwargs, streamer)))
            except Exception as err:  # end the stream instead of leaving the client waiting
                result["finish"] = f"error: {err}"
                streamer.end()

        thread = threading.Thread(target=run)
        thread.start()

        def chunk(delta: dict, finish=None) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": service.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n"

        def events():
            yield chunk({"role": "assistant", "content": ""})
            for piece in streamer:
                if piece:
                    yield chunk({"content": piece})
            thread.join()
            yield chunk({}, result.get("finish", "stop"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def load_service(model_path: str, dtype: str | None = None, limits: dict | None = None,
                 trust_remote_code: bool = True) -> ChatService:
    model, processor = load_chat_model(model_path, dtype, trust_remote_code)
    return ChatService(model, processor, model_id=model_path, limits=limits)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ml-mamba-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder or Hub repo id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--max-images", type=int, default=DEFAULT_LIMITS["max_images"])
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_LIMITS["max_prompt_tokens"])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_LIMITS["max_new_tokens"])
    parser.add_argument("--saved-states", type=int, default=DEFAULT_LIMITS["saved_states"],
                        help="conversation states kept to continue the next turn from (0: re-prefill every turn)")
    args = parser.parse_args(argv)
    import uvicorn

    service = load_service(args.model, args.dtype, {"max_images": args.max_images,
                                                    "max_prompt_tokens": args.max_prompt_tokens,
                                                    "max_new_tokens": args.max_new_tokens,
                                                    "saved_states": args.saved_states})
    uvicorn.run(build_app(service), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
