"""Reading original checkpoints safely and renaming their keys with a strict account of every tensor.

* `resolve_file` finds a file in a local folder or downloads it from the Hub (`hf_hub_download`, token and cache from
  the usual places).
* `load_pickle` reads a PyTorch pickle with `torch.load(weights_only=True)` (no code execution), memory-mapped.
* `KeyMapper` applies ordered regex rename rules; any source key no rule takes is an error, as is any target key
  left unfilled (`check_against`), with the shapes compared before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class ConversionError(ValueError):
    """A checkpoint does not match what the converter expects (keys, shapes or configuration)."""


def _listing(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {shown}{more}"


def resolve_file(source: str | os.PathLike, filename: str, subfolder: str | None = None, revision: str | None = None,
                 token: str | bool | None = None) -> Path:
    """``source`` may be the file itself, a local folder holding ``[subfolder/]filename``, or a Hub repo id."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / subfolder / filename if subfolder else path / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{candidate} does not exist (looked for {filename!r} in the folder {path}).")
        return candidate
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source!r} is neither an existing file or folder nor a Hub repo id (owner/name).")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(source), filename=filename, subfolder=subfolder, revision=revision,
                                token=token))


def load_pickle(path: str | os.PathLike) -> dict:
    """A PyTorch checkpoint read with ``weights_only=True`` (tensors and plain containers only), memory-mapped when the
    file is in the zip format so a multi-GB checkpoint is not copied into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def sub_dict(checkpoint: Mapping, key: str, where: str) -> dict[str, torch.Tensor]:
    """``checkpoint[key]`` as a flat {name: tensor} dict, with an error naming what was found instead."""
    if key not in checkpoint:
        raise ConversionError(f"{where} has no {key!r} entry; found {sorted(checkpoint)}.")
    value = checkpoint[key]
    if not isinstance(value, Mapping) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise ConversionError(f"{where}[{key!r}] should map parameter names to tensors.")
    return dict(value)


def layer_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted N of the keys ``{prefix}N.…``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


class KeyMapper:
    """Rename the keys of one source state dict by ordered ``(regex, replacement)`` rules, first match wins.

    Every source key must be taken by a rule; ``drop`` rules take a key and produce nothing (for tensors the target
    does not have, e.g. a tied LM head). ``unused()`` lists the keys no rule took.
    """

    def __init__(self, name: str, rules: Iterable[tuple[str, str | None]]):
        self.name = name
        self.rules = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rename(self, key: str) -> str | None:
        """The target name of ``key``; ``None`` when a drop rule takes it. Raises KeyError when no rule matches."""
        for pattern, replacement in self.rules:
            if pattern.fullmatch(key):
                return None if replacement is None else pattern.sub(replacement, key)
        raise KeyError(key)

    def apply(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, unused = {}, []
        for key, tensor in state.items():
            try:
                target = self.rename(key)
            except KeyError:
                unused.append(key)
                continue
            if target is None:
                continue
            if target in out:
                raise ConversionError(f"{self.name}: two source keys map to {target!r}.")
            out[target] = tensor
        if unused:
            raise ConversionError(f"{self.name}: {len(unused)} key(s) that no conversion rule uses (is this the right "
                                  f"kind of checkpoint?):{_listing(unused)}")
        return out


def check_against(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | torch.Size],
                  what: str) -> None:
    """Raise unless ``converted`` has exactly the keys of ``expected`` with the same shapes."""
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint:{_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the model does not have:{_listing(unexpected)}")
    mismatched = []
    for key in sorted(set(expected) & set(converted)):
        want = tuple(expected[key].shape if isinstance(expected[key], torch.Tensor) else expected[key])
        got = tuple(converted[key].shape)
        if want != got:
            mismatched.append(f"{key}: checkpoint {got}, model {want}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):{_listing(mismatched)}")
    if problems:
        raise ConversionError(f"{what} does not fit the model:\n" + "\n".join(problems))
