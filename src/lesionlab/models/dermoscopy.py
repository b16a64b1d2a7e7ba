"""Dermoscopy or an ordinary photo of skin: the lesion detector's third component.

The likeliest wrong input a screening service gets is a phone photo of skin, and the two distances of
``detector.py`` accept almost all of them: they are fitted on lesions alone, and a clinical photo of a rash is
close to a lesion in colour and texture (the bundled model refused 6% of SD-198 clinical photos and labelled
94% malignant). Telling dermoscopy from clinical photos is a two-class problem once examples of the second
class exist, so this is a discriminator, not a distance: an L2-regularised logistic regression on the
L2-normalised backbone features, the pixel statistics of ``image_statistics`` and a few cues of the
dermoscopic frame (``dermoscopy_cues``), positives the run's training lesions, negatives clinical or natural
photos given by the user. Its threshold is set on validation lesions, like the distances', so the refusal
budget still holds for real lesions whatever the negatives were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Inverse L2 penalty of the logistic regression, on standardised inputs: 0.001 to 0.1 refuse the same held-out
#: SD-198 photos (all) and test lesions (0.2%) with the bundled model; 0.0001 refuses 0.9% of test lesions.
DEFAULT_C = 0.01


def discriminator_inputs(features: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The discriminator's input rows: L2-normalised backbone features and ``image_statistics``, side by side."""
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.hstack([f, np.asarray(stats, np.float64)])


@dataclass
class DermoscopyDiscriminator:
    """Logistic regression on standardised ``discriminator_inputs``: its logit is the log-odds that an image
    is not dermoscopic; refused above ``threshold`` (set on validation lesions by the caller)."""

    mean: np.ndarray  # F, of the fitting rows
    scale: np.ndarray  # F
    coef: np.ndarray  # F
    intercept: float
    threshold: float = float("inf")
    negatives: tuple[str, ...] = ()  # the photo folders it was fitted on, so a refit can use them again

    @classmethod
    def fit(cls, lesions: np.ndarray, others: np.ndarray, c: float = DEFAULT_C) -> DermoscopyDiscriminator:
        """``lesions`` and ``others`` are ``discriminator_inputs`` rows; the classes are weighted equally (there
        are many more lesions than photos), so the logit is not shifted by how many photos were given."""
        from sklearn.linear_model import LogisticRegression

        x = np.vstack([lesions, others])
        y = np.r_[np.zeros(len(lesions)), np.ones(len(others))]
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        model.fit((x - mean) / scale, y)
        return cls(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]))

    def score(self, inputs: np.ndarray) -> np.ndarray:
        """Log-odds that each row is not a dermoscopic image."""
        return ((np.asarray(inputs, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
