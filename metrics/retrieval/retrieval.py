"""Image-text retrieval Recall@K and mAP, both directions, as an `evaluate` metric.

    import evaluate
    retrieval = evaluate.load("metrics/retrieval")          # this folder
    retrieval.compute(predictions=scores, references=caption_images, ks=[1, 5, 10])

One example per caption: `predictions` is that caption's score for every image of the gallery (a row of the
caption-by-image similarity matrix, all rows the same length) and `references` the index of its image. Several
captions may share an image (COCO's five): image-to-text retrieval counts a hit when any of them is in the top K.
"""

import datasets
import evaluate
import numpy as np
import torch

from dclip.evaluation import recall_from_scores


_DESCRIPTION = __doc__
_CITATION = """\
@article{dclip2025, title={Distill CLIP (DCLIP): Enhancing Image-Text Retrieval via Cross-Modal Transformer
Distillation}, journal={arXiv preprint arXiv:2505.21549}, year={2025}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): for each caption, its score against every image.
    references (list of int): for each caption, the index of its image.
    ks (list of int, optional): the cut-offs K of Recall@K. Default [1, 5, 10].
Returns:
    image_retrieval_recall@K: text-to-image, the fraction of captions whose image is in their top K.
    text_retrieval_recall@K: image-to-text, the fraction of images with one of their captions in their top K.
    image_retrieval_mAP, text_retrieval_mAP: mean average precision over the full rankings.
Examples:
    >>> retrieval = evaluate.load("metrics/retrieval")
    >>> retrieval.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]], references=[0, 1, 1], ks=[1])
    {'image_retrieval_recall@1': 0.6666666666666666, 'text_retrieval_recall@1': 1.0, 'image_retrieval_mAP': 0.8333333333333334, 'text_retrieval_mAP': 1.0}
"""  # noqa: E501 (a doctest's expected output is one line)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.List(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://arxiv.org/abs/2505.21549", "https://github.com/LAION-AI/CLIP_benchmark"],
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        scores = torch.as_tensor(np.asarray(predictions, dtype=np.float32))  # (captions, images)
        references = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2:
            raise ValueError("every prediction must hold one score per image of the same gallery")
        if len(references) and (references.min() < 0 or references.max() >= scores.shape[1]):
            raise ValueError(f"references must index the {scores.shape[1]} images, got "
                             f"{references.min()}..{references.max()}")
        return recall_from_scores(scores.t(), scores, references, tuple(int(k) for k in ks))
