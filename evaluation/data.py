"""Load a task's examples from the Hugging Face Hub or from local files, checking every row.

Sources (the `data` argument):

- nothing: the task's Hub copy (`Task.hub`, the lmms-lab copies of the benchmarks), via `datasets.load_dataset`;
- a Hub dataset id ("owner/name"): that dataset, with the task's split;
- a `.jsonl` / `.json` / `.parquet` file, or a folder holding `<task>.jsonl|json|parquet`: one row per question,
  with the fields of `Task.schema`; an `image` that is a path is relative to the file's folder (or `image_dir`);
- any other folder: a dataset folder in the Hub layout (e.g. `data/validation-*.parquet`), read like a Hub dataset.

Images may be paths, URLs, `datasets.Image` columns or `{"bytes": ...}` records; they are opened only when a batch
needs them, so a 200k-question benchmark does not sit in memory.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .tasks import Example, RowError, Task, TaskDataError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IMAGE_FIELDS = ("image", "image_path", "img_path")
URL_FIELDS = ("image_link", "image_url", "url")
ID_FIELDS = ("question_id", "id", "questionId")


@dataclass
class DataSource:
    """Where a task's examples came from (recorded in the results and checked when a run resumes)."""

    kind: str  # "hub", "hub-folder" or "file"
    location: str
    split: str | None
    config: str | None
    num_rows: int  # before `limit`
    limit: int | None

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "split": self.split, "config": self.config,
                "num_rows": self.num_rows, "limit": self.limit}


class DatasetImage:
    """A picklable, lazy reference to the image in row `index` of a `datasets.Dataset` column."""

    def __init__(self, dataset, index: int, column: str):
        self.dataset, self.index, self.column = dataset, index, column

    def __call__(self) -> Image.Image:
        return _decode(self.dataset[self.index][self.column])


def _decode(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path") is not None:
        return Image.open(value["path"])
    raise TypeError(f"Cannot open an image from {type(value).__name__}.")


def open_image(image: Any) -> Image.Image:
    """An `Example.image` as an RGB PIL image (paths, URLs, bytes records and lazy references are opened here)."""
    from transformers.image_utils import load_image

    if callable(image):
        image = image()
    if isinstance(image, (str, Path)):
        image = load_image(str(image))  # a path or an http(s) URL
    else:
        image = _decode(image)
    return image.convert("RGB")


def _read_dataset(task: Task, data: str | None, split: str | None):
    """(datasets.Dataset, GQA-style image index or None, kind, location, folder for relative image paths)."""
    import datasets

    if data is None:
        if task.hub is None:
            raise ValueError(f"Task {task.name!r} has no Hub copy: give its local file (--data {task.name}=PATH). "
                             f"Rows look like {task.schema}.")
        return (*_read_hub(task, task.hub.repo, split or task.hub.split, task.hub.config), "hub", task.hub.repo, None)
    path = Path(data)
    if path.is_dir():
        for suffix in LOCAL_SUFFIXES:
            if (path / f"{task.name}{suffix}").is_file():
                path = path / f"{task.name}{suffix}"
                break
        else:
            dataset = datasets.load_dataset(str(path), split=split or (task.hub.split if task.hub else "train"))
            return dataset, None, "hub-folder", str(path), path
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"--data {task.name}={data}: expected a .jsonl, .json or .parquet file, "
                             f"got {path.suffix!r}.")
        try:
            dataset = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # arrow's messages do not say which file
            raise TaskDataError(f"Could not read {path} as {LOCAL_SUFFIXES[path.suffix]} rows of task {task.name!r} "
                                f"({type(error).__name__}: {error}). Rows look like {task.schema}.") from error
        return dataset, None, "file", str(path), path.parent
    if data.count("/") == 1 and not data.startswith((".", "/")):
        split = split or (task.hub.split if task.hub else "test")
        return (*_read_hub(task, data, split, None), "hub", data, None)
    raise FileNotFoundError(f"--data {task.name}={data}: no such file or folder (and not a Hub dataset id owner/name).")


def _read_hub(task: Task, repo: str, split: str, config: str | None):
    """(questions, image index): GQA on the Hub keeps its images in a second config, joined on an image id."""
    import datasets

    questions = datasets.load_dataset(repo, config, split=split)
    hub = task.hub
    if hub is None or repo != hub.repo or not hub.images_config:
        return questions, None
    images = datasets.load_dataset(repo, hub.images_config, split=split)
    position = {image_id: index for index, image_id in enumerate(images["id"])}
    missing = sorted({image_id for image_id in questions[hub.image_key] if image_id not in position})
    if missing:
        raise TaskDataError(f"{repo}: {len(missing)} image ids of the questions are not in config "
                            f"{hub.images_config!r}, e.g. {missing[:3]}.")
    return questions, (images, position, hub.image_key)


def _image_columns(dataset) -> tuple[str | None, bool]:
    """(the image column, whether it is a `datasets.Image` feature)."""
    import datasets

    for name in IMAGE_FIELDS:
        if name in dataset.column_names:
            return name, isinstance(dataset.features[name], datasets.Image)
    return None, False


def _resolve_path(value: str, row: dict, base: Path | None, image_dir: str | None):
    if value.startswith(("http://", "https://")):
        return value
    candidate = Path(value)
    if not candidate.is_absolute():
        root = Path(image_dir) if image_dir else base
        if root is None:
            for name in URL_FIELDS:
                if row.get(name):
                    return row[name]
            raise RowError(f"has the relative image path {value!r} but no folder to find it in: give --image-dir")
        candidate = root / candidate
    if not candidate.is_file():
        raise RowError(f"has image {value!r}, which does not exist (looked for {candidate})")
    return str(candidate)


def load_examples(task: Task, data: str | None = None, *, split: str | None = None, limit: int | None = None,
                  image_dir: str | None = None) -> tuple[list[Example], DataSource]:
    """The task's examples (the first `limit` rows when given) and where they came from.

    Raises `TaskDataError` naming the source and the row when a row lacks its image, its question or its answers.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}.")
    dataset, joined, kind, location, base = _read_dataset(task, data, split)
    num_rows = len(dataset)
    if limit is not None and limit < num_rows:
        dataset = dataset.select(range(limit))
    image_column, is_feature = _image_columns(dataset)
    if task.media == "video":
        image_column, is_feature = ("video" if "video" in dataset.column_names else None), False
    if image_column is None and joined is None:
        what = "'video'" if task.media == "video" else f"one of {IMAGE_FIELDS}"
        raise TaskDataError(f"{location}: no image column ({what}) in {dataset.column_names}; "
                            f"rows of task {task.name!r} look like {task.schema} (a .json file holds a list of "
                            f"such rows, a .jsonl file one per line).")
    null_images = set()
    if is_feature:  # check for missing images without decoding them, then read the other columns only
        null_images = {i for i, null in enumerate(dataset.data.column(image_column).is_null().to_pylist()) if null}
        rows = dataset.remove_columns([image_column])
    else:
        rows = dataset

    examples, raw_ids = [], []
    for index, row in enumerate(rows):
        question_id = next((row[name] for name in ID_FIELDS if row.get(name) is not None), index)
        try:
            if joined is not None:
                images, position, key = joined
                image = DatasetImage(images, position[row[key]], "image")
            elif is_feature:
                if index in null_images:
                    raise RowError("has no image")
                image = DatasetImage(dataset, index, image_column)
            else:
                image = row.get(image_column)
                if image is None:
                    raise RowError(f"has no image (field {image_column!r} is missing or null)")
                if task.media == "video":
                    if isinstance(image, str) or not image:
                        raise RowError(f"has 'video' = {image!r}: {task.name} needs a non-empty list of frame paths")
                    image = [_resolve_path(frame, row, base, image_dir) for frame in image]
                elif isinstance(image, str):
                    image = _resolve_path(image, row, base, image_dir)
                elif isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
                    image = _resolve_path(image["path"], row, base, image_dir)
            example = Example(uid="", question_id=str(question_id), image=image, question=task.question(row),
                              target=task.target(row), extras=task.extras(row))
        except RowError as problem:
            raise TaskDataError(f"{location}, row {index} (question_id {question_id!r}) {problem}. "
                                f"Rows of task {task.name!r} look like {task.schema}.") from None
        examples.append(example)
        raw_ids.append(str(question_id))
    if not examples:
        raise TaskDataError(f"{location}: no rows to evaluate for task {task.name!r}.")
    # The predictions file is keyed by question id; ids that repeat (MME: one id per image) get "#k" suffixes.
    counts, seen = Counter(raw_ids), Counter()
    for example in examples:
        qid = example.question_id
        example.uid = qid if counts[qid] == 1 else f"{qid}#{seen[qid]}"
        seen[qid] += 1
    if kind != "file" and split is None:  # the split `_read_dataset` used
        split = task.hub.split if task.hub else ("train" if kind == "hub-folder" else "test")
    source = DataSource(kind=kind, location=location, split=split,
                        config=task.hub.config if kind == "hub" and task.hub and location == task.hub.repo else None,
                        num_rows=num_rows, limit=limit)
    return examples, source
