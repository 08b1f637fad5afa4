"""The benchmarks: where their data is, which fields a row needs, the prompt, and how the answers are scored.

Prompts follow LLaVA-1.5 as used by TRI-ML's vlm-evaluation (the seed papers' harness) and lmms-eval; scoring follows
each benchmark's official script (see `scoring`). Each task turns a raw row (from the Hub or a local file) into an
`Example`, builds the user prompt of an example, and scores a run through its `evaluate` module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .metric_modules import load_metric

SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."
TRUE_FALSE_QUESTION = 'Based on the image, is this statement "True" or "False"? {statement}'
TRUE_FALSE_ANSWER = 'Respond with "True" or "False" directly.'
MULTIPLE_CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
MME_YES_NO_SUFFIX = " Please answer yes or no."  # MME's own suffix, replaced by the short-answer line (lmms-eval)


class TaskDataError(ValueError):
    """A row of a task's data is malformed; the message names the source and the row."""


class RowError(Exception):
    """Raised by a task while reading one row; the data loader adds where the row is (see `TaskDataError`)."""


@dataclass
class Example:
    """One question of a benchmark, independent of where it came from.

    `uid` is unique within the run (it keys the predictions file); `image` is a PIL image, a path, a URL or a
    zero-argument callable returning the image; `target` is the task's reference (answers, label, index).
    """

    uid: str
    question_id: str
    image: Any
    question: str
    target: Any
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the Hugging Face Hub (`datasets.load_dataset(repo, config, split=split)`)."""

    repo: str
    split: str
    config: str | None = None
    images_config: str | None = None  # GQA keeps its images in a second config, joined on `image_key`
    image_key: str | None = None


def _field(row: dict, names: tuple[str, ...], task: str, what: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise RowError(f"has no {' / '.join(repr(n) for n in names)} field: {task} needs {what}")


def _answer_strings(value, task: str) -> list[str]:
    """Human answers given as strings or as official annotation dicts ({"answer": ..., "answer_id": ...})."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise RowError(f"has 'answers' = {value!r}: {task} needs a list of human answers")
    answers = [item["answer"] if isinstance(item, dict) else item for item in value]
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise RowError(f"has 'answers' = {value!r}: {task} needs a non-empty list of strings")
    return answers


class Task:
    """A benchmark. Subclasses set the class attributes and implement `target`, `prompt` and `score`."""

    name: ClassVar[str]
    title: ClassVar[str]  # the benchmark's usual name, for model cards
    hub: ClassVar[HubSource | None] = None
    max_new_tokens: ClassVar[int] = 128  # the seed papers' harness generates up to 128 tokens
    question_fields: ClassVar[tuple[str, ...]] = ("question",)
    # Next-token scoring (the seed papers' way for POPE/VSR): the candidate answers whose first-token probabilities
    # decide the answer; None for tasks that are scored from generated text only.
    candidates: ClassVar[tuple[str, ...] | None] = None
    # "image": one image per question (`Example.image`); "video": a list of frames (`Example.image` holds the list,
    # fed as `videos=`), the question placed before or after it as `question_first` says.
    media: ClassVar[str] = "image"
    question_first: ClassVar[bool] = False
    options: ClassVar[dict[str, tuple]] = {}  # option name -> allowed values (first = default)
    schema: ClassVar[str] = ""  # the fields of a local row, for the docs and errors
    headline: ClassVar[tuple[tuple[str, str, str], ...]] = (("accuracy", "accuracy", "accuracy"),)

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"Task {self.name!r} has no option(s) {unknown}; its options are "
                             f"{ {k: list(v) for k, v in self.options.items()} }.")
        self.settings = {name: allowed[0] for name, allowed in self.options.items()}
        for name, value in options.items():
            if value is None:
                continue
            if value not in self.options[name]:
                raise ValueError(f"Task {self.name!r}: option {name}={value!r} is not one of "
                                 f"{list(self.options[name])}.")
            self.settings[name] = value

    # --- rows -> examples ---------------------------------------------------------------------------------------
    def target(self, row: dict) -> Any:
        raise NotImplementedError

    def extras(self, row: dict) -> dict:
        return {}

    def question(self, row: dict) -> str:
        return str(_field(row, self.question_fields, self.name, "the question text"))

    # --- prompting and scoring ----------------------------------------------------------------------------------
    def prompt(self, example: Example) -> str:
        raise NotImplementedError

    def score(self, predictions: list[str], examples: list[Example]) -> dict:
        raise NotImplementedError

    @property
    def answer_mode(self) -> str:
        return self.settings.get("answer_mode", "generate")

    def model_index_metrics(self, metrics: dict) -> list[tuple[str, str, float]]:
        """(metric_type, metric_name, value) of the headline numbers, for the model card."""
        return [(kind, name, metrics[key]) for key, kind, name in self.headline if key in metrics]

    def describe(self) -> dict:
        return {"task": self.name, **self.settings}


class VQAv2(Task):
    name, title = "vqav2", "VQAv2"
    hub = HubSource("lmms-lab/VQAv2", split="validation")
    schema = ('{"question_id", "image", "question", "answers": [10 human answers, strings or {"answer": ...}], '
              '"answer_type" (optional: per-type accuracy)}')
    headline = (("accuracy", "accuracy", "VQA accuracy"),)
    metric_config = "vqav2"

    def target(self, row):
        return _answer_strings(_field(row, ("answers",), self.name, "the human answers"), self.name)

    def extras(self, row):
        return {"group": row.get("answer_type")}

    def prompt(self, example):
        return f"{example.question}\n{SHORT_ANSWER}"

    def score(self, predictions, examples):
        groups = [e.extras.get("group") for e in examples]
        report = load_metric("vqa_accuracy", self.metric_config).compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            groups=groups if all(g is not None for g in groups) else None)
        if "accuracy_by_group" in report:
            report["accuracy_by_answer_type"] = report.pop("accuracy_by_group")
        return report


class TextVQA(VQAv2):
    name, title = "textvqa", "TextVQA"
    hub = HubSource("lmms-lab/textvqa", split="validation")
    schema = ('{"question_id", "image", "question", "answers": [10 human answers], "ocr_tokens": [...] (optional, '
              'for --ocr before/after)}')
    metric_config = "textvqa"
    # Cobra found the OCR tokens must come *before* the question for a Mamba LM (58.2 vs 43.0); LLaVA puts them after.
    options = {"ocr": ("none", "before", "after")}

    def extras(self, row):
        tokens = row.get("ocr_tokens")
        if self.settings["ocr"] != "none" and tokens is None:
            raise RowError(f"has no 'ocr_tokens' field: --ocr {self.settings['ocr']} needs the OCR tokens of "
                           f"each image")
        return {"ocr_tokens": list(tokens or [])}

    def prompt(self, example):
        ocr = f"Reference OCR token: {', '.join(example.extras['ocr_tokens'])}"
        if self.settings["ocr"] == "before":
            return f"{ocr}\n{example.question}\n{SHORT_ANSWER}"
        if self.settings["ocr"] == "after":
            return f"{example.question}\n{ocr}\n{SHORT_ANSWER}"
        return f"{example.question}\n{SHORT_ANSWER}"


class VizWiz(VQAv2):
    name, title = "vizwiz", "VizWiz-VQA"
    hub = HubSource("lmms-lab/VizWiz-VQA", split="val")
    schema = ('{"question_id", "image", "question", "answers": [10 human answers], "answerable": 0/1 or '
              '"category"/"answer_type": "unanswerable"|... (optional: unanswerability AP and F1)}')
    metric_config = "vizwiz"
    headline = (("accuracy", "accuracy", "VQA accuracy"), ("unanswerable_f1", "f1", "unanswerable F1"))

    def extras(self, row):
        if row.get("answerable") is not None:
            answerable = int(row["answerable"])
        elif row.get("category") is not None or row.get("answer_type") is not None:
            answerable = int((row.get("category") or row.get("answer_type")) != "unanswerable")
        else:
            answerable = None
        return {"answerable": answerable}

    def prompt(self, example):
        return f"{example.question}\n{UNANSWERABLE_HINT}\n{SHORT_ANSWER}"

    def score(self, predictions, examples):
        answerable = [e.extras["answerable"] for e in examples]
        return load_metric("vqa_accuracy", "vizwiz").compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            answerable=answerable if all(a is not None for a in answerable) else None)


class GQA(Task):
    name, title = "gqa", "GQA"
    hub = HubSource("lmms-lab/GQA", split="testdev", config="testdev_balanced_instructions",
                    images_config="testdev_balanced_images", image_key="imageId")
    schema = '{"question_id", "image", "question", "answer": str}'
    headline = (("accuracy", "accuracy", "accuracy"),)

    def target(self, row):
        return str(_field(row, ("answer",), self.name, "the gold answer"))

    def prompt(self, example):
        return f"{example.question}\n{SHORT_ANSWER}"

    def score(self, predictions, examples):
        return load_metric("vqa_exact_match", "gqa").compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples])


class DigitsVQA(GQA):
    """Open-ended exact match on a local file, e.g. the digits demo's held-out set (contract 2)."""

    name, title = "digits-vqa", "digits VQA"
    hub = None
    max_new_tokens = 8  # what the digits demo generates
    schema = ('{"question_id", "image": "images/<name>.png" (relative to the file), "question", "answer": str, '
              '"question_type" (optional: per-type accuracy)}')

    def extras(self, row):
        return {"group": row.get("question_type")}

    def prompt(self, example):
        return example.question

    def score(self, predictions, examples):
        groups = [e.extras.get("group") for e in examples]
        report = load_metric("vqa_exact_match", "digits").compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            groups=groups if all(g is not None for g in groups) else None)
        if "accuracy_by_group" in report:
            report["accuracy_by_question_type"] = report.pop("accuracy_by_group")
        return report


class VideoDigits(DigitsVQA):
    """Exact match on questions about a video given as frames, e.g. the video demo's held-out set
    (``ml-mamba-demo --task video`` writes ``eval/video_digits.jsonl``); the question comes before the video, as the
    demo trains it."""

    name, title = "video-digits", "video digits"
    media, question_first = "video", True
    schema = ('{"question_id", "video": ["frames/<name>.png", ...] (paths relative to the file), "question", '
              '"answer": str, "question_type" (optional: per-type accuracy)}')


class _Binary(Task):
    options = {"answer_mode": ("probabilities", "generate")}
    variant: ClassVar[str]

    def score(self, predictions, examples):
        groups = [e.extras.get("group") for e in examples]
        return load_metric("binary_vqa", self.variant).compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            groups=groups if all(g is not None for g in groups) else None)


class POPE(_Binary):
    name, title = "pope", "POPE"
    hub = HubSource("lmms-lab/POPE", split="test")
    schema = '{"question_id", "image", "question", "answer": "yes"|"no", "category": random|popular|adversarial}'
    candidates = ("Yes", "No")
    variant = "pope"
    headline = (("accuracy", "accuracy", "accuracy (mean over splits)"), ("f1", "f1", "F1 (mean over splits)"))

    def target(self, row):
        answer = str(_field(row, ("answer", "label"), self.name, 'the answer "yes" or "no"')).strip().lower()
        if answer not in ("yes", "no"):
            raise RowError(f"has answer {answer!r}: {self.name} needs 'yes' or 'no'")
        return answer

    def extras(self, row):
        return {"group": row.get("category")}

    def prompt(self, example):
        return f"{example.question}\n{SHORT_ANSWER}"


class VSR(_Binary):
    name, title = "vsr", "VSR"
    hub = HubSource("cambridgeltl/vsr_zeroshot", split="test")  # images: COCO files (--image-dir) or `image_link`
    schema = ('{"question_id" (optional), "image", "caption": the statement (or "question"), "label": 1/0 or '
              'true/false, "relation" (optional)}')
    question_fields = ("caption", "question")
    candidates = ("True", "False")
    variant = "vsr"

    def target(self, row):
        label = _field(row, ("label", "answer"), self.name, "the label (1/0 or true/false)")
        text = str(label).strip().lower()
        if text in ("1", "true"):
            return "true"
        if text in ("0", "false"):
            return "false"
        raise RowError(f"has label {label!r}: {self.name} needs 1/0 or true/false")

    def prompt(self, example):
        return f"{TRUE_FALSE_QUESTION.format(statement=example.question)}\n{TRUE_FALSE_ANSWER}"


class ScienceQAImg(Task):
    name, title = "scienceqa-img", "ScienceQA-IMG"
    hub = HubSource("lmms-lab/ScienceQA", split="test", config="ScienceQA-IMG")
    schema = '{"question_id", "image", "question", "choices": [str, ...], "answer": index of the right choice, "hint"}'

    def target(self, row):
        choices = _field(row, ("choices",), self.name, "the list of choices")
        answer = _field(row, ("answer",), self.name, "the index of the right choice")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise RowError(f"has answer {answer!r}: {self.name} needs an index into its {len(choices)} choices")
        return answer

    def extras(self, row):
        choices = list(row["choices"])
        if not 2 <= len(choices) <= 5:
            raise RowError(f"has {len(choices)} choices: ScienceQA questions have 2 to 5 (letters A-E)")
        return {"choices": choices, "hint": row.get("hint") or ""}

    def prompt(self, example):
        letters = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(example.extras["choices"]))
        context = f"Context: {example.extras['hint']}\n" if example.extras["hint"] else ""
        return f"{context}{example.question}\n{letters}\n{MULTIPLE_CHOICE_ANSWER}"

    def score(self, predictions, examples):
        return load_metric("scienceqa_accuracy").compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            num_choices=[len(e.extras["choices"]) for e in examples])


class MME(Task):
    name, title = "mme", "MME"
    hub = HubSource("lmms-lab/MME", split="test")
    schema = ('{"question_id", "image", "question", "answer": "Yes"|"No", "category": e.g. "existence", '
              '"image_id" (the two questions of an image share it; lmms-lab uses question_id for that)}')
    headline = (("perception_score", "mme_perception", "perception score"),
                ("cognition_score", "mme_cognition", "cognition score"))

    def target(self, row):
        answer = str(_field(row, ("answer",), self.name, 'the answer "Yes" or "No"'))
        if answer.strip().lower() not in ("yes", "no"):
            raise RowError(f"has answer {answer!r}: {self.name} needs Yes or No")
        return answer

    def extras(self, row):
        category = _field(row, ("category",), self.name, "the MME category")
        image_id = row.get("image_id") if row.get("image_id") is not None else row.get("question_id")
        if image_id is None:
            raise RowError("has no 'image_id' or 'question_id': MME pairs the two questions of an image by it")
        return {"category": str(category), "image_id": str(image_id)}

    def prompt(self, example):
        return f"{example.question.strip().replace(MME_YES_NO_SUFFIX, '')}\n{SHORT_ANSWER}"

    def score(self, predictions, examples):
        return load_metric("mme").compute(
            return_scores=True, predictions=predictions, references=[e.target for e in examples],
            categories=[e.extras["category"] for e in examples], image_ids=[e.extras["image_id"] for e in examples])


TASKS: dict[str, type[Task]] = {task.name: task for task in (VQAv2, TextVQA, VizWiz, GQA, POPE, VSR, ScienceQAImg,
                                                             MME, DigitsVQA, VideoDigits)}


def get_task(name: str, **options) -> Task:
    """The task called `name` with its options (e.g. `get_task("textvqa", ocr="before")`)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available tasks: {', '.join(TASKS)}.")
    return TASKS[name](**options)
