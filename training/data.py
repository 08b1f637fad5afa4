"""Training data for ML-Mamba: LLaVA-format JSON + image folder, or any `datasets` dataset, as TRL's
conversational vision format (a ``"messages"`` column of chat turns and an ``"images"`` column of images).

Every sample is checked up front, before the trainer starts, so that bad data fails with an error naming the sample
(``bad_samples="error"``, the default) or is dropped and counted (``bad_samples="skip"``) instead of crashing deep
inside a training step. A sample is bad when:

- its conversation is missing, empty, not a list of turns, or has no assistant answer (nothing to train on);
- a turn has an unknown role or a value that is not text;
- it has more ``<image>`` markers than images, or images but markers for only some of them;
- an image file is missing (or, with ``verify_images=True``, cannot be decoded).

LLaVA conventions: ``"from"`` is ``human``/``gpt``/``system``; ``"image"`` is one path or a list of paths, relative
to ``image_folder``. An ``<image>`` marker becomes an image item exactly where it stands (one newline right after it
is dropped, as LLaVA writes ``"<image>\\n"``). A sample with one image and no marker gets the image at the start of
its first user turn, as LLaVA's own preprocessing does. Samples without ``"image"`` are text-only and mix freely with
image samples.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")
BAD_SAMPLE_POLICIES = ("error", "skip")
MAX_REASONS_SHOWN = 10


class BadSampleError(ValueError):
    """Raised when the data holds samples that cannot be trained on (``bad_samples="error"``)."""


@dataclass
class DataReport:
    """What `load_llava_json` / `prepare_dataset` kept and dropped: ``skipped`` maps a sample name to its reason."""

    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    image_samples: int = 0
    text_only_samples: int = 0

    def summary(self) -> str:
        text = (f"{self.kept} samples kept ({self.image_samples} with images, {self.text_only_samples} text-only), "
                f"{len(self.skipped)} skipped")
        if self.skipped:
            shown = list(self.skipped.items())[:MAX_REASONS_SHOWN]
            text += ":\n" + "\n".join(f"  {name}: {reason}" for name, reason in shown)
            if len(self.skipped) > len(shown):
                text += f"\n  ... and {len(self.skipped) - len(shown)} more"
        return text


def _sample_name(sample, index: int) -> str:
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"sample {index}" + (f" (id={sample_id!r})" if sample_id is not None else "")


def _split_markers(text: str) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``."""
    parts = text.split(IMAGE_MARKER)
    content = []
    for position, part in enumerate(parts):
        if position > 0:
            content.append({"type": "image", "text": None})
            if part.startswith("\n"):
                part = part[1:]
        if part:
            content.append({"type": "text", "text": part})
    return content


def llava_sample_to_messages(sample, image_folder: str | None = None, verify_images: bool = False):
    """One LLaVA sample -> ``(messages, image_paths)``; raises ``ValueError`` with the reason when it is bad."""
    if not isinstance(sample, dict):
        raise ValueError(f"expected a JSON object, got {type(sample).__name__}")
    turns = sample.get("conversations")
    images = sample.get("image", sample.get("images"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(path, str) for path in images):
        raise ValueError(f"'image' must be a path or a list of paths, got {images!r}")
    paths = [path if image_folder is None or os.path.isabs(path) else os.path.join(image_folder, path)
             for path in images]
    return _checked(llava_turns_to_messages(turns), paths, verify_images)


def llava_turns_to_messages(turns) -> list[dict]:
    """LLaVA's ``[{"from": "human", "value": "<image>\\n..."}, ...]`` -> chat messages with image items in place."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("empty or missing 'conversations'")
    messages = []
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {turn_index} must be an object with 'from' and 'value', got {turn!r}")
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"turn {turn_index} has unknown role {turn['from']!r} (expected one of "
                             f"{sorted(LLAVA_ROLES)})")
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {turn_index} has a non-text value {turn['value']!r}")
        messages.append({"role": role, "content": _split_markers(turn["value"])})
    return messages


def _checked(messages: list[dict], paths: list, verify_images: bool):
    """Marker/image counts, an assistant answer, and image files: the checks every source goes through."""
    if not any(message["role"] == "assistant" and any(item.get("text") for item in message["content"])
               for message in messages):
        raise ValueError("no assistant answer to train on")
    markers = sum(item["type"] == "image" for message in messages for item in message["content"])
    if markers > len(paths):
        raise ValueError(f"{markers} {IMAGE_MARKER} marker(s) but only {len(paths)} image(s)")
    if markers == 0 and len(paths) == 1:  # LLaVA's convention: the image goes first in the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("an image but no user turn to put it in")
        first_user["content"].insert(0, {"type": "image", "text": None})
    elif markers != len(paths):
        raise ValueError(f"{len(paths)} images but {markers} {IMAGE_MARKER} marker(s); mark where each image goes")
    for path in paths:
        if isinstance(path, str):
            if not os.path.isfile(path):
                raise ValueError(f"image file not found: {path!r}")
            if verify_images:
                _verify_image(path)
    return messages, paths


def _verify_image(path: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for corrupt files
        raise ValueError(f"image file {path!r} cannot be decoded ({type(err).__name__}: {err})") from None


def _apply_policy(bad: dict[str, str], total: int, bad_samples: str, source: str) -> None:
    if bad_samples not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"`bad_samples` must be one of {BAD_SAMPLE_POLICIES}, got {bad_samples!r}.")
    if not bad:
        return
    shown = "\n".join(f"  {name}: {reason}" for name, reason in list(bad.items())[:MAX_REASONS_SHOWN])
    more = f"\n  ... and {len(bad) - MAX_REASONS_SHOWN} more" if len(bad) > MAX_REASONS_SHOWN else ""
    if bad_samples == "error":
        raise BadSampleError(f"{len(bad)} of {total} samples in {source} cannot be trained on:\n{shown}{more}\n"
                             f"Fix them, or pass `bad_samples='skip'` (`--bad_samples skip`) to drop and count them.")
    logger.warning("Skipping %d of %d samples in %s:\n%s%s", len(bad), total, source, shown, more)


def _to_dataset(messages: list, images: list):
    from datasets import Dataset

    return _decode_images(Dataset.from_dict({"messages": messages, "images": images}))


def load_llava_json(json_path: str, image_folder: str | None = None, bad_samples: str = "error",
                    verify_images: bool = False, max_samples: int | None = None):
    """A LLaVA-format JSON (or JSON-lines) file -> a `datasets.Dataset` with ``messages`` and ``images`` columns.

    Args:
        json_path: ``[{"id": ..., "image": "rel/path.jpg", "conversations": [{"from": "human", "value":
            "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}]}, ...]``.
        image_folder: folder the image paths are relative to (default: the JSON file's folder).
        bad_samples: ``"error"`` raises `BadSampleError` naming every bad sample; ``"skip"`` drops them with a
            warning and a count (see the returned `DataReport`).
        verify_images: also decode-check every image file (slower; by default only existence is checked).
        max_samples: keep only the first N samples (for smoke runs).

    Returns:
        ``(dataset, report)``. Images are decoded lazily when a sample is read.
    """
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"LLaVA data file not found: {json_path!r}")
    with open(json_path, encoding="utf-8") as handle:
        if json_path.endswith(".jsonl"):
            samples = [json.loads(line) for line in handle if line.strip()]
        else:
            samples = json.load(handle)
    if not isinstance(samples, list):
        raise ValueError(f"{json_path!r} must hold a JSON list of samples, got {type(samples).__name__}.")
    if max_samples is not None:
        samples = samples[:max_samples]
    if image_folder is None:
        image_folder = os.path.dirname(os.path.abspath(json_path))
    elif not os.path.isdir(image_folder):
        raise FileNotFoundError(f"image_folder {image_folder!r} is not a folder.")

    report, all_messages, all_images = DataReport(), [], []
    for index, sample in enumerate(_progress(samples, "Checking samples")):
        try:
            messages, paths = llava_sample_to_messages(sample, image_folder, verify_images)
        except ValueError as err:
            report.skipped[_sample_name(sample, index)] = str(err)
            continue
        all_messages.append(messages)
        all_images.append(paths)
    _apply_policy(report.skipped, len(samples), bad_samples, repr(json_path))
    report.kept = len(all_images)
    report.image_samples = sum(bool(paths) for paths in all_images)
    report.text_only_samples = report.kept - report.image_samples
    if not all_messages:
        raise BadSampleError(f"No usable samples in {json_path!r}.")
    return _to_dataset(all_messages, all_images), report


def prepare_dataset(dataset, bad_samples: str = "error", source: str = "the dataset"):
    """Check and normalise a `datasets.Dataset` for SFTTrainer.

    Accepts TRL's conversational format (``messages`` with string or ``[{"type": ...}]`` contents, plus an optional
    ``images`` list or single ``image`` column) and LLaVA's (``conversations`` + ``image``: loaded images or paths).
    Returns ``(dataset, report)`` with ``messages`` and ``images`` columns, bad samples handled by ``bad_samples`` as
    in `load_llava_json`. Images are not decoded during the check.
    """
    columns = set(dataset.column_names)
    llava = "conversations" in columns and "messages" not in columns
    if "messages" not in columns and not llava:
        raise ValueError(f"{source} has columns {sorted(columns)}; expected 'messages' (+ 'images'/'image') or LLaVA's "
                         f"'conversations' (+ 'image').")
    image_column = "images" if "images" in columns else "image" if "image" in columns else None
    view = _without_image_decoding(dataset, image_column)

    def check(batch):
        out = {"messages": [], "images": [], "_reason": []}
        turns_column = batch["conversations" if llava else "messages"]
        images_column = batch[image_column] if image_column else [None] * len(turns_column)
        for turns, images in zip(turns_column, images_column):
            images = [] if images is None else list(images) if isinstance(images, list) else [images]
            try:
                if llava:
                    messages, _ = _checked(llava_turns_to_messages(turns), [None] * len(images), verify_images=False)
                else:
                    _check_chat(turns, len(images))
                    messages = turns
                for image in images:
                    path = image if isinstance(image, str) else (image or {}).get("path") \
                        if isinstance(image, dict) and not image.get("bytes") else None
                    if path is not None and not path.startswith(("http://", "https://")) and not os.path.isfile(path):
                        raise ValueError(f"image file not found: {path!r}")
                reason = None
            except ValueError as err:
                messages, reason = [], str(err)
            out["messages"].append(messages)
            out["images"].append(images)
            out["_reason"].append(reason)
        return out

    checked = view.map(check, batched=True, remove_columns=view.column_names, desc="Checking samples")
    reasons = checked["_reason"]
    ids = dataset["id"] if "id" in columns else None
    report = DataReport(skipped={(f"sample {i}" + (f" (id={ids[i]!r})" if ids else "")): reason
                                 for i, reason in enumerate(reasons) if reason is not None})
    _apply_policy(report.skipped, len(dataset), bad_samples, source)
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    if not keep:
        raise BadSampleError(f"No usable samples in {source}.")
    kept = checked.select(keep) if len(keep) < len(checked) else checked
    counts = [len(images) for images in kept["images"]]
    if llava:
        dataset = kept.remove_columns("_reason")
    else:  # keep the user's own columns and content structure; only the image column is renamed or added
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        dataset = dataset.remove_columns([image_column]) if image_column else dataset
        dataset = dataset.add_column("images", kept["images"])
    report.kept = len(counts)
    report.image_samples = sum(count > 0 for count in counts)
    report.text_only_samples = report.kept - report.image_samples
    return _decode_images(dataset), report


def _check_chat(messages, num_images: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("empty or missing 'messages'")
    placeholders = 0
    has_answer = False
    first_user_is_string = None
    for turn_index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise ValueError(f"turn {turn_index} must have a role in {CHAT_ROLES}, got {message!r}")
        content = message.get("content")
        if isinstance(content, str):
            texts = [content]
            if message["role"] == "user" and first_user_is_string is None:
                first_user_is_string = True
        elif isinstance(content, list):
            texts = [item.get("text") for item in content if isinstance(item, dict) and item.get("type") == "text"]
            placeholders += sum(isinstance(item, dict) and item.get("type") == "image" for item in content)
            if message["role"] == "user" and first_user_is_string is None:
                first_user_is_string = False
        else:
            raise ValueError(f"turn {turn_index} has content of type {type(content).__name__}")
        if message["role"] == "assistant" and any(texts):
            has_answer = True
    if not has_answer:
        raise ValueError("no assistant answer to train on")
    if placeholders == 0 and first_user_is_string and num_images:
        return  # TRL puts the images before the first user message
    if placeholders != num_images:
        raise ValueError(f"{placeholders} image placeholder(s) but {num_images} image(s)")


def _without_image_decoding(dataset, image_column: str | None):
    """A view of ``dataset`` whose image column yields undecoded ``{"bytes", "path"}`` dicts (or the raw paths)."""
    from datasets import Image, List

    if image_column is None:
        return dataset
    feature = dataset.features[image_column]
    if isinstance(feature, Image):
        return dataset.cast_column(image_column, Image(decode=False))
    if isinstance(feature, List) and isinstance(feature.feature, Image):
        return dataset.cast_column(image_column, List(Image(decode=False)))
    return dataset


def _decode_images(dataset):
    """The ``images`` column as `List(Image())`, so samples read as PIL images (from paths or bytes alike)."""
    from datasets import Image, List

    return dataset.cast_column("images", List(Image()))


def _progress(iterable: Iterable, description: str):
    try:
        total = len(iterable)
    except TypeError:
        total = None
    if total is not None and total < 10_000:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total)


def load_training_data(data_path: str | None = None, image_folder: str | None = None, dataset_name: str | None = None,
                       dataset_config: str | None = None, split: str = "train", bad_samples: str = "error",
                       verify_images: bool = False, max_samples: int | None = None):
    """The training data named by the `DataArguments` fields: a LLaVA JSON file (``data_path``) or a `datasets`
    dataset (``dataset_name``: a Hub id, a local folder saved with ``save_to_disk``, or a loader script/folder
    understood by `datasets.load_dataset`). Returns ``(dataset, report)``."""
    if (data_path is None) == (dataset_name is None):
        raise ValueError("Give exactly one data source: `data_path` (a LLaVA-format JSON file) or `dataset_name` (a "
                         f"`datasets` dataset); got data_path={data_path!r}, dataset_name={dataset_name!r}.")
    if data_path is not None:
        dataset, report = load_llava_json(data_path, image_folder, bad_samples, verify_images, max_samples)
    else:
        dataset = _load_named_dataset(dataset_name, dataset_config, split)
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        dataset, report = prepare_dataset(dataset, bad_samples, source=repr(dataset_name))
    return dataset, report


def _load_named_dataset(name: str, config: str | None, split: str):
    from datasets import load_dataset, load_from_disk

    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")) and not config:
        dataset = load_from_disk(name)
        if hasattr(dataset, "keys"):  # a DatasetDict
            if split not in dataset:
                raise ValueError(f"{name!r} has splits {list(dataset)}, not {split!r}; set `dataset_train_split`.")
            dataset = dataset[split]
        return dataset
    return load_dataset(name, config, split=split)


class VideoSampleCollator:
    """Wraps TRL's vision-language collator for samples with videos: a ``videos`` column (per sample, one list of
    frames per ``{"type": "video"}`` item of its messages, in order) is put into those items, and the processor's
    chat template then expands each to its frames (``pixel_values_videos``). Samples without videos pass as they
    are. TRL (1.16) knows images only; this is the smallest addition that keeps its collator, loss and padding."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return self.collator([with_videos(example) for example in examples])


def with_videos(example: dict) -> dict:
    """``example`` with its ``videos`` moved into the messages' video items (a copy; the dataset is untouched)."""
    videos = list(example.get("videos") or [])
    if not videos:
        return {key: value for key, value in example.items() if key != "videos"}
    messages = []
    for message in example["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [dict(item, video=videos.pop(0)) if item.get("type") == "video" and videos else item
                       for item in content]
        messages.append({**message, "content": content})
    if videos:
        raise BadSampleError(f"{len(videos)} video(s) more than the messages' video items")
    return {**{key: value for key, value in example.items() if key != "videos"}, "messages": messages}


class PackedSampleCollator:
    """Padding-free batches for vision-language samples: each sample is collated alone by the wrapped (TRL) collator,
    without padding, and the batch becomes one row: ``input_ids`` and ``labels`` concatenated, ``position_ids``
    restarting at 0 at every sample (the model resets its conv and SSM state there, so each sample trains exactly as
    alone; tests/test_packing.py), images and video frames in order. TRL (1.16) refuses ``padding_free`` for vision
    datasets; this is the same layout its text collator builds."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        pieces = [self.collator([example]) for example in examples]
        batch = {"input_ids": torch.cat([p["input_ids"] for p in pieces], dim=1),
                 "position_ids": torch.cat([torch.arange(p["input_ids"].shape[1]) for p in pieces])[None]}
        labels = []
        for piece in pieces:
            piece_labels = piece["labels"].clone()
            piece_labels[:, 0] = -100  # the previous sample's last token must not learn to predict this one
            labels.append(piece_labels)
        batch["labels"] = torch.cat(labels, dim=1)
        for key in ("pixel_values", "pixel_values_videos"):
            tensors = [p[key] for p in pieces if p.get(key) is not None]
            if tensors:
                batch[key] = torch.cat(tensors, dim=0)
        return batch
