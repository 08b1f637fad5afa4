"""ScienceQA multiple-choice accuracy as an `evaluate` module (LLaVA's `eval_science_qa.py` answer parsing).

    import evaluate
    metric = evaluate.load("<ml_mamba.evaluation>/metrics/scienceqa_accuracy")
    metric.compute(predictions=["B", "The answer is A."], references=[1, 1], num_choices=[2, 3])  # {'accuracy': 0.5}
"""

import datasets
import evaluate

from ml_mamba.evaluation.scoring import compute_multiple_choice

_DESCRIPTION = """
Multiple-choice accuracy with LLaVA's ScienceQA parsing: the answer counts when it is a bare option letter, starts
with "X. ", or contains "The answer is X"; a letter beyond the question's number of choices counts as wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[int]`): the index of the right choice (0 = "A").
    num_choices (`list[int]`): the number of choices of each question.
    return_scores (`bool`, defaults to False): also return the per-question `scores` (1.0 or 0.0).
Returns:
    accuracy (`float` in [0, 1]), and `scores` when asked for.
"""

_CITATION = """
@inproceedings{lu2022scienceqa,
  title={Learn to Explain: Multimodal Reasoning via Thought Chains for Science Question Answering},
  author={Lu, Pan and Mishra, Swaroop and Xia, Tony and Qiu, Liang and Chang, Kai-Wei and Zhu, Song-Chun and
          Tafjord, Oyvind and Clark, Peter and Kalyan, Ashwin}, booktitle={NeurIPS}, year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ScienceqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scienceqa.github.io"])

    def _compute(self, predictions, references, num_choices=None, return_scores=False):
        if num_choices is None:
            raise ValueError("scienceqa_accuracy needs `num_choices` (the number of choices of each question).")
        report = compute_multiple_choice(predictions, references, num_choices)
        if not return_scores:
            report.pop("scores")
        return report
