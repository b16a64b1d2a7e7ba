"""lesionlab: transfer-learning skin-lesion classifiers (benign vs malignant). A screening aid, not a diagnosis."""

__version__ = "0.1.0"
