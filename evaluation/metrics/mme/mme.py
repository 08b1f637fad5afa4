"""MME perception and cognition scores as an `evaluate` module (MME's `eval_tool/calculation.py`).

    import evaluate
    metric = evaluate.load("<ml_mamba.evaluation>/metrics/mme")
    metric.compute(predictions=["Yes", "No"], references=["Yes", "No"], categories=["color", "color"],
                   image_ids=["img1", "img1"])  # perception_score 200.0 (acc 1.0 + acc+ 1.0, times 100)
"""

import datasets
import evaluate

from ml_mamba.evaluation.scoring import compute_mme

_DESCRIPTION = """
MME: each image has two yes/no questions. An answer is parsed as "yes"/"no" when it is that word or when that word
occurs in its first 4 characters (lower-cased), else "other". Per category: acc = fraction of questions right,
acc+ = fraction of images with both questions right, score = 100 * (acc + acc+). The perception score sums its 10
categories (max 2000), the cognition score its 4 (max 800).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[str]`): "Yes" or "No".
    categories (`list[str]`): the MME category of each question (e.g. "existence", "code_reasoning").
    image_ids (`list[str]`): the image of each question (the two questions of an image share it).
    return_scores (`bool`, defaults to False): also return the per-question `scores` (1.0 or 0.0).
Returns:
    perception_score, cognition_score, total_score, by_category ({category: acc, acc_plus, score, ...}).
"""

_CITATION = """
@article{fu2023mme,
  title={MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models},
  author={Fu, Chaoyou and Chen, Peixian and Shen, Yunhang and Qin, Yulei and Zhang, Mengdan and Lin, Xu and
          Yang, Jinrui and Zheng, Xiawu and Li, Ke and Sun, Xing and Wu, Yunsheng and Ji, Rongrong},
  journal={arXiv preprint arXiv:2306.13394}, year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mme(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"])

    def _compute(self, predictions, references, categories=None, image_ids=None, return_scores=False):
        if categories is None or image_ids is None:
            raise ValueError("mme needs `categories` and `image_ids` (one per question).")
        report = compute_mme(predictions, references, categories, image_ids)
        if not return_scores:
            report.pop("scores")
        return report
