"""The benchmarks' official scoring rules as plain Python functions.

Per-example rules (`vqa_accuracy`, `parse_yes_no`, ...) and whole-run reports (`compute_*`, the functions the
`evaluate` modules in `metrics/` wrap). Accuracies are fractions in [0, 1]; MME scores are in the benchmark's own
points (up to 200 per category). Each rule names the script it follows.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence

from .normalization import normalize_eval_ai_answer, normalize_vqa_answer, process_punctuation

# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out subsets of the humans.


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over i of min(1, #{j != i : answers[j] == prediction} / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer.")
    scores = []
    for i in range(len(answers)):
        matches = sum(1 for j, answer in enumerate(answers) if j != i and answer == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction (GT-Vision-Lab/VQA `vqaEval.py`).

    The prediction gets the full normalisation; the human answers (already normalised in the official annotations)
    only get `process_punctuation`, and only when they are not all identical, exactly as the official script does.
    """
    answers = list(answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    return _leave_one_out_accuracy(normalize_vqa_answer(prediction), answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction (m4c `TextVQAAccuracyEvaluator`): EvalAI normalisation of both sides."""
    return _leave_one_out_accuracy(normalize_eval_ai_answer(prediction),
                                   [normalize_eval_ai_answer(answer) for answer in answers])


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz-VQA accuracy of one prediction (VizWiz `vqaEval.py`): the prediction is normalised, the human answers
    are compared as they are."""
    return _leave_one_out_accuracy(normalize_vqa_answer(prediction), list(answers))


VQA_VARIANTS = {"vqav2": vqa_accuracy, "textvqa": textvqa_accuracy, "vizwiz": vizwiz_accuracy}


def predicts_unanswerable(prediction: str) -> bool:
    """VizWiz: a prediction says "unanswerable" when its normalised form is exactly that word."""
    return normalize_vqa_answer(prediction) == "unanswerable"


# --------------------------------------------------------------------------------------------------------------------
# Exact-match tasks.


def gqa_exact_match(prediction: str, answer: str) -> bool:
    """GQA (TRI-ML vlm-evaluation + the official GQA `eval.py`): delete all ASCII punctuation from the prediction,
    lower-case it, and compare it with the gold answer."""
    return prediction.translate(str.maketrans("", "", string.punctuation)).lower() == answer


def simple_exact_match(prediction: str, answer: str) -> bool:
    """Open-ended exact match of the digits demo (contract 2): compare ``x.strip().lower().rstrip(".")``."""
    return prediction.strip().lower().rstrip(".") == answer.strip().lower().rstrip(".")


EXACT_MATCH_VARIANTS = {"gqa": gqa_exact_match, "digits": simple_exact_match}


# --------------------------------------------------------------------------------------------------------------------
# Binary answers (POPE: yes/no, VSR: true/false) and their metrics.


def parse_yes_no(text: str) -> str:
    """POPE answer parsing of LLaVA's `eval_pope.py`: keep the first sentence, drop commas, answer "no" when one of the
    words is "No", "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_true_false(text: str) -> str:
    """VSR answer parsing for generated text: "true"/"false" from the first word that is one of them, else "other".

    The seed papers score VSR from next-token probabilities instead (see `runner`); this parser is for text mode.
    """
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in ("true", "false"):
            return word
    return "other"


BINARY_PARSERS = {"pope": parse_yes_no, "vsr": parse_true_false}
BINARY_POSITIVE = {"pope": "yes", "vsr": "true"}
BINARY_NEGATIVE = {"pope": "no", "vsr": "false"}


def binary_metrics(predictions: Sequence[str], labels: Sequence[str], positive: str) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the ratio of positive predictions (LLaVA `eval_pope.py`), with 0.0 where the
    script would divide by zero. A prediction other than the two labels counts as wrong and as negative."""
    tp = sum(p == positive and t == positive for p, t in zip(predictions, labels))
    fp = sum(p == positive and t != positive for p, t in zip(predictions, labels))
    fn = sum(p != positive and t == positive for p, t in zip(predictions, labels))
    correct = sum(p == t for p, t in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == positive for p in predictions) / len(predictions)}


# --------------------------------------------------------------------------------------------------------------------
# VizWiz unanswerability (VizWiz `vqaEval.py` uses sklearn's average_precision_score and f1_score, positive class =
# unanswerable). Written out here so the harness does not need scikit-learn.


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """sklearn's `average_precision_score` for binary labels: sum over thresholds of (R_k - R_{k-1}) * P_k."""
    positives = sum(labels)
    if positives == 0:
        return 0.0
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        selected = [label for label, score in zip(labels, scores) if score >= threshold]
        tp = sum(selected)
        recall = tp / positives
        total += (recall - previous_recall) * (tp / len(selected))
        previous_recall = recall
    return total


def f1_binary(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """sklearn's `f1_score` for the positive class 1 (0.0 when it is undefined)."""
    tp = sum(1 for t, p in zip(labels, predictions) if t == 1 and p == 1)
    fp = sum(1 for t, p in zip(labels, predictions) if t == 0 and p == 1)
    fn = sum(1 for t, p in zip(labels, predictions) if t == 1 and p == 0)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


# --------------------------------------------------------------------------------------------------------------------
# ScienceQA multiple choice (LLaVA `eval_science_qa.py`).

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")


def parse_choice_letter(text: str, num_choices: int) -> int:
    """The index of the chosen option, or -1 (LLaVA's ScienceQA parsing): the answer is a bare letter, or starts with
    "X. ", or contains "The answer is X"; letters past the number of choices do not count."""
    text = text.replace("\n", ". ")
    letter = None
    if text.strip() in SCIENCEQA_OPTIONS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        match = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        if match:
            letter = match.group(1)
    if letter is None or letter not in SCIENCEQA_OPTIONS[:num_choices]:
        return -1
    return SCIENCEQA_OPTIONS.index(letter)


# --------------------------------------------------------------------------------------------------------------------
# MME (its `eval_tool/calculation.py`).

MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def parse_mme_answer(text: str) -> str:
    """MME parsing: lower-case; "yes"/"no" as is, else "yes" or "no" when it occurs in the first 4 characters
    (checked in that order), else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


# --------------------------------------------------------------------------------------------------------------------
# Whole-run reports (what the `evaluate` modules return).


def _check_lengths(**columns: Sequence) -> int:
    lengths = {name: len(values) for name, values in columns.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"All inputs must have the same length, got {lengths}.")
    count = next(iter(lengths.values()))
    if count == 0:
        raise ValueError("Nothing to score: the inputs are empty.")
    return count


def _by_group(scores: Sequence[float], groups: Sequence[str] | None) -> dict[str, float] | None:
    if groups is None:
        return None
    buckets = defaultdict(list)
    for score, group in zip(scores, groups):
        buckets[str(group)].append(score)
    return {group: sum(values) / len(values) for group, values in sorted(buckets.items())}


def compute_vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]], variant: str = "vqav2",
                         groups: Sequence[str] | None = None, answerable: Sequence[int] | None = None) -> dict:
    """Mean VQA accuracy (`variant`: "vqav2", "textvqa" or "vizwiz"), optionally per group (e.g. answer type).

    For "vizwiz", `answerable` (1/0 per question) adds the official unanswerability average precision and F1.
    """
    if variant not in VQA_VARIANTS:
        raise ValueError(f"Unknown VQA accuracy variant {variant!r}; expected one of {sorted(VQA_VARIANTS)}.")
    _check_lengths(predictions=predictions, references=references, groups=groups, answerable=answerable)
    rule = VQA_VARIANTS[variant]
    scores = [rule(prediction, answers) for prediction, answers in zip(predictions, references)]
    report = {"accuracy": sum(scores) / len(scores)}
    if groups is not None:
        report["accuracy_by_group"] = _by_group(scores, groups)
    if answerable is not None:
        unanswerable = [1 - int(flag) for flag in answerable]
        predicted = [int(predicts_unanswerable(prediction)) for prediction in predictions]
        report["unanswerable_average_precision"] = average_precision(unanswerable, predicted)
        report["unanswerable_f1"] = f1_binary(unanswerable, predicted)
    report["scores"] = scores
    return report


def compute_exact_match(predictions: Sequence[str], references: Sequence[str], variant: str = "gqa",
                        groups: Sequence[str] | None = None) -> dict:
    """Exact-match accuracy (`variant`: "gqa" or "digits"), optionally per group (e.g. question type)."""
    if variant not in EXACT_MATCH_VARIANTS:
        raise ValueError(f"Unknown exact-match variant {variant!r}; expected one of {sorted(EXACT_MATCH_VARIANTS)}.")
    _check_lengths(predictions=predictions, references=references, groups=groups)
    rule = EXACT_MATCH_VARIANTS[variant]
    scores = [float(rule(prediction, answer)) for prediction, answer in zip(predictions, references)]
    report = {"accuracy": sum(scores) / len(scores)}
    if groups is not None:
        report["accuracy_by_group"] = _by_group(scores, groups)
    report["scores"] = scores
    return report


def compute_binary_vqa(predictions: Sequence[str], references: Sequence[str], variant: str = "pope",
                       groups: Sequence[str] | None = None) -> dict:
    """POPE ("yes"/"no") or VSR ("true"/"false") metrics from answers (text, parsed the benchmark's way).

    With `groups` (POPE's random/popular/adversarial splits) each metric is given per group and the headline number
    is the mean over groups, as TRI-ML's vlm-evaluation (the seed papers' harness) reports POPE.
    """
    if variant not in BINARY_PARSERS:
        raise ValueError(f"Unknown binary variant {variant!r}; expected one of {sorted(BINARY_PARSERS)}.")
    _check_lengths(predictions=predictions, references=references, groups=groups)
    parse, positive, negative = BINARY_PARSERS[variant], BINARY_POSITIVE[variant], BINARY_NEGATIVE[variant]
    parsed = [parse(prediction) for prediction in predictions]
    labels = [str(reference).strip().lower() for reference in references]
    wrong = sorted({label for label in labels if label not in (positive, negative)})
    if wrong:
        raise ValueError(f"{variant} references must be {positive!r} or {negative!r}, got {wrong[:5]}.")
    if groups is None:
        report = binary_metrics(parsed, labels, positive)
    else:
        per_group = {}
        for group in sorted({str(g) for g in groups}):
            index = [i for i, g in enumerate(groups) if str(g) == group]
            per_group[group] = binary_metrics([parsed[i] for i in index], [labels[i] for i in index], positive)
        report = {name: sum(m[name] for m in per_group.values()) / len(per_group)
                  for name in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        report["by_group"] = per_group
    report["scores"] = [float(p == t) for p, t in zip(parsed, labels)]
    return report


def compute_multiple_choice(predictions: Sequence[str], references: Sequence[int], num_choices: Sequence[int]) -> dict:
    """ScienceQA accuracy: the parsed option letter (`parse_choice_letter`) against the index of the right answer."""
    _check_lengths(predictions=predictions, references=references, num_choices=num_choices)
    scores = [float(parse_choice_letter(prediction, count) == int(answer))
              for prediction, answer, count in zip(predictions, references, num_choices)]
    return {"accuracy": sum(scores) / len(scores), "scores": scores}


def compute_mme(predictions: Sequence[str], references: Sequence[str], categories: Sequence[str],
                image_ids: Sequence[str]) -> dict:
    """MME: per category acc (questions right), acc+ (images with all their questions right, two per image in MME) and
    score = 100 * (acc + acc+); perception and cognition are the sums of their categories' scores."""
    _check_lengths(predictions=predictions, references=references, categories=categories, image_ids=image_ids)
    known = {category for names in MME_CATEGORIES.values() for category in names}
    unknown = sorted(set(categories) - known)
    if unknown:
        raise ValueError(f"Unknown MME categories {unknown}; expected some of {sorted(known)}.")
    per_image = defaultdict(list)  # (category, image) -> [correct, ...]
    scores = []
    for prediction, answer, category, image in zip(predictions, references, categories, image_ids):
        gold = answer.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"MME answers must be Yes or No, got {answer!r} (image {image!r}).")
        correct = parse_mme_answer(prediction) == gold
        per_image[(category, image)].append(correct)
        scores.append(float(correct))
    by_category = {}
    for category in sorted({category for category, _ in per_image}):
        images = [results for (cat, _), results in per_image.items() if cat == category]
        acc = sum(sum(results) for results in images) / sum(len(results) for results in images)
        acc_plus = sum(all(results) for results in images) / len(images)
        by_category[category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                                 "images": len(images),
                                 "images_without_two_questions": sum(len(results) != 2 for results in images)}
    report = {f"{kind}_score": sum(by_category[c]["score"] for c in names if c in by_category)
              for kind, names in MME_CATEGORIES.items()}
    report["total_score"] = report["perception_score"] + report["cognition_score"]
    report["by_category"] = by_category
    report["scores"] = scores
    return report
