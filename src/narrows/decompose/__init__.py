"""Class-specific filters and the decomposed final layer ("Decomposing the Deep").

* :class:`ClassIndices`: each class's influential channel ids; the upstream JSON file and ours;
  ``random`` and ``top_weights`` baselines.
* :func:`split_head`: a timm model as pooled features ``(N, D)`` plus its final ``nn.Linear``.

The command line is ``narrows decompose extract | validate | finetune | ...``.
"""

from narrows.decompose.indices import ClassIndices
from narrows.decompose.parts import check_split, classifier_name, replace_classifier, split_head

__all__ = [
    "ClassIndices",
    "check_split",
    "classifier_name",
    "replace_classifier",
    "split_head",
]
