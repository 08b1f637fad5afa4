"""Multi-turn chat on the recurrent state: each turn processes only the tokens the model has not seen yet.

A Mamba model's cache after a turn holds the whole conversation so far in a fixed-size state. `ChatSession` keeps
that cache and the token ids it has seen; the next turn renders the whole chat with the processor's template as
usual, and when the new prompt starts with the seen ids, `generate` continues from the cache and processes only the
rest (transformers slices the prompt by the cache's token count; the model drops the images the state already
holds). When the prompt does not start with them (an edited history, or an answer that tokenizes differently once
written back) the turn re-prefills the whole chat: the result is the same, only slower. `StateStore` does the same
for a stateless API (the server): it keeps the last few states by the ids they have seen.

```python
>>> session = ChatSession(model, processor)
>>> session.ask("Which digit is shown?", images=[image])
'seven'
>>> session.ask("Is it odd?")  # processes only this turn's tokens
'yes'
>>> session.save("chat.safetensors"); session = ChatSession.load("chat.safetensors", model, processor)
```
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict

import torch

from modeling_ml_mamba.ml_mamba_compat import GENERATE_CACHE_NAME, cache_token_count
from modeling_ml_mamba.ml_mamba_state import load_state, save_state


def load_chat_model(model_path: str, dtype: str | None = None, trust_remote_code: bool = True):
    """``(model in eval mode, processor)`` of a saved folder or Hub repo, as the serving commands load it (``dtype``:
    a torch dtype name, or None for the checkpoint's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_ml_mamba  # noqa: F401  (registers the ML-Mamba Auto classes)

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                        **kwargs).eval()
    return model, AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def continues(seen: torch.Tensor | None, prompt_ids: torch.Tensor, cache=None) -> bool:
    """Whether a state that has seen the 1-D ids ``seen`` can continue into the 1-D ``prompt_ids``: they start with
    ``seen`` and add at least one token, and (given a ``cache``) transformers knows it has seen them (5.25+; on older
    releases every turn re-prefills)."""
    if seen is None or not 0 < len(seen) < len(prompt_ids) or not torch.equal(prompt_ids[:len(seen)], seen):
        return False
    return cache is None or cache_token_count(cache) == len(seen)


def generate_turn(model, inputs: dict, cache=None, streamer=None, **generate_kwargs):
    """Run `generate` for one sequence (``inputs`` from the processor, batch 1), continuing from ``cache`` if given.

    Returns ``(new token ids, cache after the turn, ids the cache has seen)``; the cache has seen the prompt and
    every new token but the last (sampled, never fed)."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"A chat turn takes one sequence, got a batch of {inputs['input_ids'].shape[0]}.")
    extra = {GENERATE_CACHE_NAME: cache} if cache is not None else {}
    with torch.no_grad():
        out = model.generate(**inputs, **extra, streamer=streamer, return_dict_in_generate=True, **generate_kwargs)
    sequence = out.sequences[0].cpu()
    return sequence[inputs["input_ids"].shape[1]:], getattr(out, GENERATE_CACHE_NAME), sequence[:-1]


class ChatSession:
    """A conversation with an image-text-to-text model: `ask` adds a user turn and returns the answer; turns after
    the first continue from the saved state (``reuse_state=False``: every turn re-prefills the whole chat, the
    reference). ``last_turn`` says how many prompt tokens a turn actually processed."""

    def __init__(self, model, processor, system: str | None = None, reuse_state: bool = True):
        self.model, self.processor, self.system, self.reuse_state = model, processor, system, reuse_state
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its state."""
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        self.cache, self.seen, self.last_turn = None, None, {}

    def ask(self, text: str, images=(), streamer=None, **generate_kwargs) -> str:
        """Add a user message (``text`` after the ``images``: PIL images, paths, URLs or data URLs) and return the
        model's answer, streamed to ``streamer`` if given. ``generate_kwargs`` go to `generate` (default: greedy,
        at most 256 new tokens)."""
        content = [{"type": "image", "url": image} if isinstance(image, str) else {"type": "image", "image": image}
                   for image in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        try:
            inputs = self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
        except Exception:
            self.messages.pop()  # a bad image loses nothing of the conversation
            raise
        prompt = inputs["input_ids"][0]
        cache = self.cache if self.reuse_state and continues(self.seen, prompt, self.cache) else None
        already = len(self.seen) if cache is not None else 0
        generate_kwargs = {"max_new_tokens": 256, "do_sample": False, **generate_kwargs}
        try:
            new, self.cache, self.seen = generate_turn(self.model, inputs.to(self.model.device), cache, streamer,
                                                       **generate_kwargs)
        except BaseException:
            self.messages.pop()
            self.cache, self.seen = None, None  # the state may be half-advanced: the next turn re-prefills
            raise
        answer = self.processor.decode(new, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.last_turn = {"prompt_tokens": len(prompt), "processed_tokens": len(prompt) - already,
                          "new_tokens": len(new), "continued": cache is not None}
        return answer

    def save(self, path: str | os.PathLike) -> None:
        """Write the state, the ids it has seen and the messages (images as their paths or URLs) to ``path``."""
        if self.cache is None:
            raise ValueError("Nothing to save: the conversation has no turn yet.")
        for message in self.messages:
            if any(part.get("type") == "image" and "url" not in part for part in message["content"]):
                raise ValueError("ChatSession.save keeps images by path or URL; this conversation has an in-memory "
                                 "image. Pass images as paths, URLs or data URLs to save it.")
        save_state(self.cache, path, token_ids=self.seen)
        with open(os.fspath(path) + ".json", "w") as handle:
            json.dump({"system": self.system, "messages": self.messages}, handle)

    @classmethod
    def load(cls, path: str | os.PathLike, model, processor) -> "ChatSession":
        """A session saved by `save`, ready to continue."""
        with open(os.fspath(path) + ".json") as handle:
            saved = json.load(handle)
        session = cls(model, processor, system=saved["system"])
        session.messages = saved["messages"]
        session.cache, session.seen = load_state(path, model)
        return session


class StateStore:
    """The last ``capacity`` states of a stateless chat API, by the token ids they have seen: `take` hands out
    (a copy of) the longest one a new prompt continues; `put` stores a turn's state."""

    def __init__(self, capacity: int = 8):
        self.capacity, self.entries, self.lock = capacity, OrderedDict(), threading.Lock()

    def take(self, prompt_ids: torch.Tensor):
        """``(cache or None, number of prompt tokens it has seen)``; the stored state stays for other branches."""
        with self.lock:
            best = None
            for key, (seen, cache) in self.entries.items():
                if continues(seen, prompt_ids, cache) and (best is None or len(seen) > len(self.entries[best][0])):
                    best = key
            if best is None:
                return None, 0
            self.entries.move_to_end(best)
            seen, cache = self.entries[best]
            return copy.deepcopy(cache), len(seen)  # generate advances a cache in place

    def put(self, seen: torch.Tensor, cache) -> None:
        if self.capacity <= 0:
            return
        with self.lock:
            key = hash(tuple(seen.tolist()))
            self.entries[key] = (seen, cache)
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)


__all__ = ["ChatSession", "StateStore", "continues", "generate_turn", "load_chat_model"]
