"""Ensembles as model folders: the mean of the members' calibrated probabilities, evaluated like one run.

An ensemble folder holds ``ensemble.json`` (member paths, relative to the folder when possible),
``config.json`` (what the members are) and, after evaluation, the same files as a run:
metrics.json, calibration.json (the ensemble's own temperature and threshold, fitted on the shared
validation split), predictions.csv, figures and report.md. ``load_predictor`` turns it into an
``EnsemblePredictor``, so predict and serve accept it; exporting it means exporting each member
(``lesionlab export MEMBER``), after which its members run on ONNX Runtime.

The ensemble's temperature and threshold are fitted on validation images that the scoring model never
trained on. Two layouts of members allow that:

- **shared**: every member has the same train/validation split; validation is scored by the ensemble itself.
- **cross-fit**: the members were trained on different folds of one training pool (``train --fold k``), their
  validation folds disjoint. Validation is then *out of fold*: each image is scored by the members that held
  it out (one per fold, or several recipes per fold: members with the same split form a fold group), so the
  temperature and threshold are fitted on up to the whole training pool (2637 images instead of 528), which
  makes the operating threshold far less noisy. Test images are scored by every member. Give every fold group
  the same recipes, so that out-of-fold scores come from the same kind of model throughout.

An out-of-fold score still comes from one fold's members while a test image gets the mean of all of them.
**Inner runs** (``train --fold K --also-val-fold L``, one per pair of folds, the members' recipe) remove that
mismatch: with ``inner`` the temperature and threshold are fitted on a *nested* out-of-fold estimate, each
training image scored by the mean of the inner runs that held its fold out, an ensemble none of whose runs
saw it (docs/results.md 3.4).

Modules, each importing only the ones above it:

- :mod:`~lesionlab.ensemble.members`: which runs may be members, their splits, fold groups and layout;
- :mod:`~lesionlab.ensemble.scores`: member scores (predictions.csv or re-scoring) and how they are combined;
- :mod:`~lesionlab.ensemble.report`: the ensemble's report.md;
- :mod:`~lesionlab.ensemble.build`: creating and evaluating an ensemble folder (the entry points).

This file imports nothing, so that importing one module does not load the others.
"""
