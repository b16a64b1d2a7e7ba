"""What a ``--target diagnosis`` run learns: its classes, read from the training samples, and each sample's class.

The classes are the taxonomy codes of the diagnoses that the training pool's samples carry (HAM10000's seven, for
instance), sorted, so every fold and every seed of one dataset gets the same head. A sample with only a
benign/malignant label (an isic-kaggle folder, an ISIC 2020 "unknown") has class index -1: it still trains, by
binary cross-entropy on the head's binary logit (``optim.make_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import Taxonomy
from lesionlab.models.classifier import Diagnoses
from lesionlab.training.config import ConfigError

#: The class index of a sample without a diagnosis (or with one the head does not have).
NO_DIAGNOSIS = -1


def diagnosis_classes(samples: Sequence[Sample], taxonomy: Taxonomy) -> Diagnoses:
    """The head's classes: the sorted diagnosis codes among ``samples``, and the malignant ones by ``taxonomy``.

    ConfigError when no sample has a diagnosis, or when they are all of one class (a binary logit needs both)."""
    codes = sorted({s.diagnosis for s in samples if s.diagnosis})
    if not codes:
        raise ConfigError(
            f"--target diagnosis needs training images with a diagnosis, and none of the {len(samples)} has one "
            "(folders of benign/malignant images carry no diagnosis): add a source that has them (HAM10000 "
            "metadata, an ISIC ground-truth CSV, a CSV with a diagnosis column), or train with --target binary"
        )
    malignant = tuple(c for c in codes if taxonomy.is_malignant(c))
    if not malignant or len(malignant) == len(codes):
        kind = "malignant" if malignant else "benign"
        raise ConfigError(
            f"--target diagnosis needs benign and malignant diagnoses among the training images; they have only "
            f"{kind} ones ({', '.join(codes)}): add a source with the others, or train with --target binary"
        )
    return Diagnoses(tuple(codes), malignant)


def class_index(samples: Sequence[Sample], diagnoses: Diagnoses | None) -> np.ndarray:
    """int64 class index per sample in ``diagnoses.names``; NO_DIAGNOSIS where it has none (all, for None)."""
    index = {n: i for i, n in enumerate(diagnoses.names)} if diagnoses else {}
    return np.array([index.get(s.diagnosis or "", NO_DIAGNOSIS) for s in samples], np.int64)
