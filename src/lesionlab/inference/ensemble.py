"""An ensemble of predictors that stands in for one model: the mean of its members' calibrated probabilities.

The members arrive already loaded (``inference.loading.load_predictor`` builds them from ``ensemble.json``),
so this module knows nothing of how a folder becomes a predictor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.special import expit

from lesionlab.data.images import RESIZE_CROP
from lesionlab.inference.diagnoses import regroup
from lesionlab.inference.predictor import Images, ModelInfo, Predictor, Scores, operating_point_or_default
from lesionlab.models.detector import ensemble_refusal_score


class EnsemblePredictor(Predictor):
    """Mean of the members' calibrated probabilities; threshold from the ensemble's own calibration.json.

    It stands in for a model everywhere: only scoring (``_score``) is its own. Members may read different
    input sizes, normalisations, resizes and colour constancy; each prepares its own input from what it is given
    (PIL images: from the originals; a uint8 batch: resized where its size differs). Refusal: the median member's
    detector. Diagnosis probabilities (members with the same diagnosis head): the mean of the members' calibrated
    ones.
    """

    def __init__(self, model_dir: str | Path, members: Sequence[Predictor]):
        model_dir = Path(model_dir)
        self.members = list(members)
        op = operating_point_or_default(model_dir)
        infos = [m.info for m in self.members]
        same_norm = len({(i.mean, i.std) for i in infos}) == 1
        self.info = ModelInfo(
            model_id=op.model_id,
            backbone="ensemble(" + ",".join(i.backbone for i in infos) + ")",
            input_size=max(i.input_size for i in infos),
            mean=infos[0].mean if same_norm else (),
            std=infos[0].std if same_norm else (),
            threshold=op.threshold,
            threshold_policy=op.policy,
            temperature=op.temperature,
            tta=op.tta,
            path=str(model_dir),
            runtime="+".join(sorted({i.runtime for i in infos})),
            members=infos,
            # shared values, or: PIL images reach each member, which resizes and corrects them its own way
            resize=_shared([i.resize for i in infos], RESIZE_CROP),
            color_constancy=_shared([i.color_constancy for i in infos], "mixed"),
        )
        if len({(i.diagnoses, i.malignant_diagnoses) for i in infos}) == 1:  # diagnoses only when all share them
            self.info.diagnoses, self.info.malignant_diagnoses = infos[0].diagnoses, infos[0].malignant_diagnoses

    @property
    def refuses_non_lesions(self) -> bool:
        return any(m.refuses_non_lesions for m in self.members)

    @property
    def refusal_threshold(self) -> float | None:
        """``ood_score`` is the median member's distance / threshold, so the threshold is 1."""
        return 1.0 if self.refuses_non_lesions else None

    def _score(self, images: Images, tta: bool, with_ood: bool) -> Scores:
        """The logit of the mean of the members' calibrated probabilities (each member scoring with ``tta``);
        ``ood``: the median over the members with a detector of distance / threshold
        (``ensemble_refusal_score``), refused above 1."""
        scored = [(m, m._score(images, tta, with_ood)) for m in self.members]
        logits = mean_probability_logit([expit(s.logits / m.info.temperature) for m, s in scored])
        # the mean of the members' calibrated diagnosis probabilities: its malignant sum is the mean probability
        mask = self.info.malignant_mask  # empty unless every member has the same diagnosis head
        member_diag = [
            regroup(s.diagnoses, mask, expit(s.logits / m.info.temperature))
            for m, s in scored
            if s.diagnoses is not None and len(mask)
        ]
        diag = np.mean(member_diag, axis=0) if member_diag and len(member_diag) == len(scored) else None
        judges = [(t, s.ood) for m, s in scored if (t := m.refusal_threshold) is not None and s.ood is not None]
        if not judges:  # with_ood is off, or no member has a lesion detector
            return Scores(logits, diagnoses=diag)
        combined = ensemble_refusal_score([ood / t for t, ood in judges])
        refusing = np.sum([ood > t for t, ood in judges], axis=0)
        # members whose detector refuses an image as a clinical photo (LesionDetector.explain's reason)
        photo = [
            [w.startswith("not a dermoscopic image") for w in s.why or [""] * len(s.ood)]
            for m, s in scored
            if m.refusal_threshold is not None and s.ood is not None
        ]
        clinical = np.sum([(ood > t) & np.array(p, bool) for (t, ood), p in zip(judges, photo)], axis=0)
        why = [
            ("not a dermoscopic image: " if 2 * k > n else "")
            + f"does not look like a dermoscopic lesion image ({n} of {len(judges)} members' detectors refuse; "
            f"median score/threshold {c:.2f} > 1)"
            for n, k, c in zip(refusing, clinical, combined)
        ]
        return Scores(logits, combined, why, diag)


def _shared(values: list[str], otherwise: str) -> str:
    """The members' common value of a preprocessing setting, else ``otherwise``."""
    return values[0] if len(set(values)) == 1 else otherwise


def mean_probability_logit(member_probs: npt.ArrayLike) -> np.ndarray:
    """The logit of the mean over members (axis 0: one row per member) of their probabilities, clipped away
    from 0 and 1."""
    p = np.clip(np.mean(np.asarray(member_probs), axis=0), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))
