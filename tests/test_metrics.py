"""The official scoring rules on examples worked out by hand from the benchmarks' scripts, including their quirks, and
the `evaluate` modules that wrap them, loaded offline from their folders. Budget: ~20 s (mostly importing evaluate)."""

import os
import subprocess
import sys
import textwrap

import pytest

from ml_mamba.evaluation import load_metric, metric_path
from ml_mamba.evaluation.normalization import normalize_eval_ai_answer, normalize_vqa_answer
from ml_mamba.evaluation.scoring import (
    average_precision,
    binary_metrics,
    compute_binary_vqa,
    compute_mme,
    f1_binary,
    gqa_exact_match,
    parse_choice_letter,
    parse_mme_answer,
    parse_true_false,
    parse_yes_no,
    simple_exact_match,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                      # final period deleted, lower-cased
    ("Two dogs", "2 dogs"),               # number words become digits
    ("the red car", "red car"),           # articles dropped
    ("A man", "man"),
    ("dont know", "don't know"),          # contractions get their apostrophe
    ("It is 3.5.", "it is 3.5"),          # a period before a digit stays, the last one goes
    ("1,000", "1000"),                    # digit-comma-digit: marks are deleted, not spaced
    ("black/white", "black white"),       # a mark touching no space becomes a space
    ("black / white", "black white"),     # a mark next to a space is deleted
    ("well-known, 1,000", "wellknown 1000"),  # a digit-comma-digit anywhere deletes every mark
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("Im", "im"),                         # quirk: the key "Im" is capitalised, the text lower-cased first
    ("U.S.A.", "usa"),
    ("  yes\n", "yes"),
])
def test_official_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_eval_ai_normalisation_splits_possessives_and_drops_commas():
    assert normalize_eval_ai_answer("The man's hat, right?") == "man 's hat right"
    assert normalize_eval_ai_answer("Coca-Cola") == "coca cola"


@pytest.mark.parametrize("humans, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_counts_humans_over_ten_leave_one_out_subsets(humans, expected):
    # k humans said "yes": the k subsets without one of them hold k-1 matches, the 10-k others hold k;
    # accuracy = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10, e.g. k=2: (2/3*... ) = (2*1/3 + 8*2/3)/10 = 0.6.
    answers = ["yes"] * humans + ["no"] * (10 - humans)
    assert vqa_accuracy("Yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_the_prediction_before_matching():
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["no"] * 6) == 1.0


def test_vqa_accuracy_official_quirk_unanimous_answers_are_not_normalised():
    # Humans agreeing on "t-shirt" keep the hyphen, while the prediction becomes "t shirt": no match.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # As soon as one human disagrees, the answers get the punctuation step too: 9 matches.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    # References are never lower-cased (the official annotations already are).
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0


def test_textvqa_normalises_both_sides():
    assert textvqa_accuracy("Coca-Cola", ["coca cola"] * 5 + ["coke"] * 5) == 1.0
    assert textvqa_accuracy("yes", ["Yes"] * 10) == 1.0
    assert textvqa_accuracy("coke", ["coca cola"] * 8 + ["coke"] * 2) == pytest.approx(0.6)


def test_vizwiz_compares_raw_human_answers_with_the_normalised_prediction():
    answers = ["unanswerable"] * 6 + ["blue"] * 4
    assert vizwiz_accuracy("Unanswerable.", answers) == 1.0
    assert vizwiz_accuracy("Blue", answers) == 1.0
    assert vizwiz_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_unanswerability_average_precision_and_f1_match_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    cases = [([1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]), ([0, 0, 1, 0], [0, 0, 0, 0]), ([1, 1, 0], [1, 1, 1]),
             ([0, 1, 0, 1, 1], [0.1, 0.9, 0.4, 0.4, 0.8])]
    for labels, scores in cases:
        assert average_precision(labels, scores) == pytest.approx(
            sklearn_metrics.average_precision_score(labels, scores))
    for labels, predictions in cases[:3]:
        assert f1_binary(labels, predictions) == pytest.approx(
            sklearn_metrics.f1_score(labels, predictions, zero_division=0))


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes.", "yes", True), ("Left", "left", True), ("t-shirt", "tshirt", True),  # punctuation deleted, no space
    ("The dog", "dog", False),            # GQA keeps articles
])
def test_gqa_exact_match(prediction, answer, expected):
    assert gqa_exact_match(prediction, answer) is expected


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Seven.", "seven", True), (" 7 ", "7", True), ("7..", "7", True), ("the 7", "7", False), ("7.5", "7", False),
])
def test_digits_exact_match_is_the_demo_rule(prediction, answer, expected):
    assert simple_exact_match(prediction, answer) is expected


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is no dog", "no"), ("no, it is not", "no"),
    ("Yes. No.", "yes"),                  # only the first sentence counts
    ("Not really", "yes"),                # quirk: "Not" (capitalised) is not in LLaVA's list
    ("I don't think so", "yes"),
])
def test_pope_answer_parsing(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [("True", "true"), ("false.", "false"), ("It's true", "true"),
                                            ("maybe", "other")])
def test_vsr_answer_parsing(text, expected):
    assert parse_true_false(text) == expected


def test_binary_metrics_by_hand():
    # TP: 0, 4; FP: 1; TN: 2; FN: 3.
    metrics = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"], "yes")
    assert metrics == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                     "yes_ratio": 0.6})
    assert binary_metrics(["no", "no"], ["yes", "no"], "yes")["precision"] == 0.0  # no positive predictions


def test_pope_report_is_the_mean_over_splits():
    report = compute_binary_vqa(["Yes", "No", "Yes", "Yes"], ["yes", "no", "no", "no"], "pope",
                                groups=["random", "random", "adversarial", "adversarial"])
    assert report["by_group"]["random"]["accuracy"] == 1.0
    assert report["by_group"]["adversarial"]["accuracy"] == 0.0
    assert report["accuracy"] == 0.5 and report["yes_ratio"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        compute_binary_vqa(["Yes"], ["maybe"], "pope")


@pytest.mark.parametrize("text, choices, expected", [
    ("B", 3, 1), ("C. the answer", 3, 2), ("The answer is A.", 3, 0), ("The answer is E", 5, 4),
    ("D", 3, -1),                         # a letter past the choices is wrong
    ("b", 3, -1),                         # LLaVA matches upper-case letters only
    ("A\nB", 3, 0),                       # newlines become ". ", so this starts with "A. "
    (" A ", 2, 0),
])
def test_scienceqa_letter_parsing(text, choices, expected):
    assert parse_choice_letter(text, choices) == expected


@pytest.mark.parametrize("text, expected", [("Yes", "yes"), ("No.", "no"), ("Eyes are open", "yes"),
                                            ("I don't know", "other"), ("Not sure", "no"), ("none", "no")])
def test_mme_answer_parsing(text, expected):
    assert parse_mme_answer(text) == expected


def test_mme_scores_by_hand():
    # color: image A both right, image B one of two -> acc 3/4, acc+ 1/2 -> 125 points.
    # code_reasoning: image C one of two -> acc 1/2, acc+ 0 -> 50 points.
    report = compute_mme(predictions=["Yes", "No", "Yes", "Yes", "No", "No"],
                         references=["Yes", "No", "Yes", "No", "Yes", "No"],
                         categories=["color"] * 4 + ["code_reasoning"] * 2, image_ids=["A", "A", "B", "B", "C", "C"])
    assert report["by_category"]["color"]["score"] == pytest.approx(125.0)
    assert report["by_category"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert (report["perception_score"], report["cognition_score"], report["total_score"]) == pytest.approx(
        (125.0, 50.0, 175.0))


def test_evaluate_modules_compute_the_same_numbers():
    report = load_metric("vqa_accuracy").compute(predictions=["Yes", "two"], references=[["yes"] * 2 + ["no"] * 8,
                                                                                          ["2"] * 10],
                                                 groups=["yes/no", "number"])
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["accuracy_by_group"] == pytest.approx({"number": 1.0, "yes/no": 0.6})
    vizwiz = load_metric("vqa_accuracy", "vizwiz").compute(
        predictions=["unanswerable", "blue"], references=[["unanswerable"] * 10, ["blue"] * 10], answerable=[0, 1])
    assert vizwiz["accuracy"] == 1.0 and vizwiz["unanswerable_f1"] == 1.0
    assert load_metric("vqa_exact_match", "digits").compute(predictions=["Seven."], references=["seven"]) == {
        "accuracy": 1.0}
    assert load_metric("binary_vqa", "vsr").compute(predictions=["True", "False"], references=["true", "true"])[
        "recall"] == 0.5
    assert load_metric("scienceqa_accuracy").compute(predictions=["B", "The answer is A."], references=[1, 1],
                                                     num_choices=[2, 3]) == {"accuracy": 0.5}
    mme = load_metric("mme").compute(predictions=["Yes", "No"], references=["Yes", "No"],
                                     categories=["OCR", "OCR"], image_ids=["x", "x"], return_scores=True)
    assert mme["perception_score"] == 200.0 and mme["scores"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


def test_metric_modules_load_offline_from_a_copied_folder(tmp_path):
    """A user can copy a metric folder anywhere and `evaluate.load` it with the Hub unreachable."""
    import shutil

    shutil.copytree(metric_path("vqa_accuracy"), tmp_path / "vqa_accuracy")
    code = textwrap.dedent(f"""
        import evaluate
        metric = evaluate.load({str(tmp_path / 'vqa_accuracy')!r}, config_name="textvqa")
        print(metric.compute(predictions=["Coca-Cola"], references=[["coca cola"] * 10])["accuracy"])
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "1.0"
