"""Exact-match VQA accuracy as an `evaluate` module: GQA's rule and the digits demo's open-ended rule.

    import evaluate
    metric = evaluate.load("<ml_mamba.evaluation>/metrics/vqa_exact_match", config_name="gqa")  # or "digits"
    metric.compute(predictions=["Yes."], references=["yes"])  # {'accuracy': 1.0}

The rules live in `ml_mamba.evaluation.scoring` (`gqa_exact_match`, `simple_exact_match`).
"""

import datasets
import evaluate

from ml_mamba.evaluation.scoring import compute_exact_match

_DESCRIPTION = """
Exact-match accuracy of open-ended answers. "gqa" (default): the prediction loses all ASCII punctuation and is
lower-cased, then must equal the gold answer (TRI-ML vlm-evaluation + the official GQA eval.py). "digits": both
sides are compared as `x.strip().lower().rstrip(".")` (the ml-mamba digits demo, and any local open VQA file).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[str]`): one gold answer per question.
    groups (`list[str]`, *optional*): a group per question (e.g. question type) for `accuracy_by_group`.
    return_scores (`bool`, defaults to False): also return the per-question `scores` (1.0 or 0.0).
Returns:
    accuracy (`float` in [0, 1]), and `accuracy_by_group`, `scores` when asked for.
"""

_CITATION = """
@inproceedings{hudson2019gqa,
  title={GQA: A New Dataset for Real-World Visual Reasoning and Compositional Question Answering},
  author={Hudson, Drew A and Manning, Christopher D}, booktitle={CVPR}, year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://cs.stanford.edu/people/dorarad/gqa/evaluate.html"])

    def _compute(self, predictions, references, groups=None, return_scores=False):
        variant = "gqa" if self.config_name == "default" else self.config_name
        report = compute_exact_match(predictions, references, variant=variant, groups=groups)
        if not return_scores:
            report.pop("scores")
        return report
