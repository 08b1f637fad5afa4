"""VQA accuracy as an `evaluate` module: VQAv2, TextVQA and VizWiz-VQA scored like their official scripts.

    import evaluate
    metric = evaluate.load("<ml_mamba.evaluation>/metrics/vqa_accuracy", config_name="vqav2")  # or textvqa, vizwiz
    metric.compute(predictions=["Two"], references=[["2"] * 10])  # {'accuracy': 1.0}

The rules live in `ml_mamba.evaluation.scoring` (`vqa_accuracy`, `textvqa_accuracy`, `vizwiz_accuracy`).
"""

import datasets
import evaluate

from ml_mamba.evaluation.scoring import compute_vqa_accuracy

_DESCRIPTION = """
VQA accuracy: each prediction scores min(#humans who gave that answer / 3, 1), averaged over the 10 leave-one-out
subsets of the 10 human answers, after the official answer normalisation (punctuation, number words to digits,
articles, contractions). Configurations: "vqav2" (default; GT-Vision-Lab/VQA vqaEval.py), "textvqa" (m4c
TextVQAAccuracyEvaluator with EvalAI normalisation of both sides) and "vizwiz" (VizWiz vqaEval.py; pass `answerable`
to also get the unanswerability average precision and F1).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[list[str]]`): the human answers of each question (10 in the official data).
    groups (`list[str]`, *optional*): a group per question (e.g. answer type) for `accuracy_by_group`.
    answerable (`list[int]`, *optional*, "vizwiz" only): 1 if the question is answerable, 0 if not.
    return_scores (`bool`, defaults to False): also return the per-question `scores`.
Returns:
    accuracy (`float` in [0, 1]), and `accuracy_by_group`, `unanswerable_average_precision`, `unanswerable_f1`,
    `scores` when asked for.
Examples:
    >>> metric = evaluate.load("vqa_accuracy")
    >>> metric.compute(predictions=["yes"], references=[["yes", "yes"] + ["no"] * 8])["accuracy"]  # 2 humans
    0.6
"""

_CITATION = """
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR}, year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA", "https://textvqa.org", "https://vizwiz.org"])

    def _compute(self, predictions, references, groups=None, answerable=None, return_scores=False):
        variant = "vqav2" if self.config_name == "default" else self.config_name
        report = compute_vqa_accuracy(predictions, references, variant=variant, groups=groups, answerable=answerable)
        if not return_scores:
            report.pop("scores")
        return report
