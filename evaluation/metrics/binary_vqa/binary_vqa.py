"""Yes/no and true/false VQA metrics as an `evaluate` module: POPE and VSR.

    import evaluate
    metric = evaluate.load("<ml_mamba.evaluation>/metrics/binary_vqa", config_name="pope")  # or "vsr"
    metric.compute(predictions=["Yes, there is.", "No"], references=["yes", "yes"])
    # {'accuracy': 0.5, 'precision': 1.0, 'recall': 0.5, 'f1': 0.666..., 'yes_ratio': 0.5}

The rules live in `ml_mamba.evaluation.scoring` (`parse_yes_no`, `parse_true_false`, `binary_metrics`).
"""

import datasets
import evaluate

from ml_mamba.evaluation.scoring import compute_binary_vqa

_DESCRIPTION = """
Accuracy, precision, recall, F1 and the ratio of positive answers for binary VQA. "pope" (default): answers are
parsed like LLaVA's eval_pope.py (first sentence; "no" if it contains the word No/no/not, else "yes"); give
`groups` (random/popular/adversarial) to get each split and their mean, as the seed papers' harness reports POPE.
"vsr": answers are parsed to "true"/"false" (first such word). The seed papers score both from the next-token
probabilities of "Yes"/"No" ("True"/"False"); the ml-mamba harness turns those into the answer it passes here.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers (free text).
    references (`list[str]`): "yes"/"no" ("pope") or "true"/"false" ("vsr").
    groups (`list[str]`, *optional*): a group per question; the metrics are then per group and averaged over groups.
    return_scores (`bool`, defaults to False): also return the per-question `scores` (1.0 or 0.0).
Returns:
    accuracy, precision, recall, f1, yes_ratio (`float` in [0, 1]); `by_group` and `scores` when asked for.
"""

_CITATION = """
@inproceedings{li2023pope,
  title={Evaluating Object Hallucination in Large Vision-Language Models},
  author={Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
  booktitle={EMNLP}, year={2023}
}
@article{liu2023vsr,
  title={Visual Spatial Reasoning}, author={Liu, Fangyu and Emerson, Guy and Collier, Nigel},
  journal={TACL}, year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BinaryVqa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/RUCAIBox/POPE", "https://github.com/cambridgeltl/visual-spatial-reasoning"])

    def _compute(self, predictions, references, groups=None, return_scores=False):
        variant = "pope" if self.config_name == "default" else self.config_name
        report = compute_binary_vqa(predictions, references, variant=variant, groups=groups)
        if not return_scores:
            report.pop("scores")
        return report
