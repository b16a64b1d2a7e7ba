"""``calibrate_run``: a model folder copied with its operating point re-fitted on a site's labelled sample.

The source folder (a run, the bundled model, or an ensemble) is never written. Its predictor scores the sample
(raw logits, with TTA as the source's operating point was fitted unless told otherwise); ``site.fit_site`` refits
temperature and threshold; the copy is built in a temporary folder beside ``out`` and renamed onto it only when
whole, so ``out`` is either absent or a servable model folder.

The copy holds the source's files (model.pt, model.onnx, preprocess.json, the lesion detector and its
measurement, config.json, splits.csv, ...), except what described the old operating point: predictions.csv and
figures/ are left out; metrics.json keeps the source's content under ``source_run`` (its blocks were computed at
the old threshold) beside the site's; report.md and a model card gain a ``## Site calibration`` section.
New: calibration.json (with ``provenance``), site_calibration.json (the record and the sample's report) and
site_scores.csv (the sample's logits). An ensemble's copy names the same members (ensemble.json's paths are
rewritten relative to the copy); the members keep their own operating points, only the ensemble's is refitted.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.images import BadImageError, open_sample, opened_batches
from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.evaluation.metrics import DEFAULT_POLICY, DEFAULT_RESAMPLES, check_policy, metrics_with_ci
from lesionlab.evaluation.site import (
    SiteError,
    check_sample,
    fit_site,
    report_section,
    sample_report,
    with_section,
)

if TYPE_CHECKING:
    from lesionlab.inference.predictor import Predictor

#: the source's files that describe its old operating point, or that the copy writes anew
LEFT_OUT = frozenset(
    {rf.PREDICTIONS, rf.FIGURES, rf.CALIBRATION, rf.METRICS, rf.STATE, rf.SITE_CALIBRATION, rf.SITE_SCORES}
)


@dataclass
class SiteScores:
    """Raw (uncalibrated) logits of a site sample, aligned with its samples; ``tta``: how they were scored."""

    samples: list[Sample]
    logits: np.ndarray
    tta: bool

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.samples], np.int64)


def score_site(
    predictor: Predictor,
    samples: Sequence[Sample],
    tta: bool | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> SiteScores:
    """Raw logits of every sample (``predict_logits``: no temperature), ``batch_size`` decoded images at a time.
    ``tta`` None: as the model's operating point was fitted. SiteError naming an unreadable image."""
    if not samples:
        raise SiteError("the site sample holds no images")
    use_tta = predictor.use_tta(tta)
    logits: list[np.ndarray] = []
    for batch in opened_batches(samples, open_sample, batch_size, "site", progress):
        images = []
        for s, x in batch:
            if isinstance(x, BadImageError):
                raise SiteError(
                    f"site image {s.relpath} ({s.path}) cannot be read: {x.reason}; fix it or remove its row"
                )
            images.append(x)
        logits.append(predictor.predict_logits(images, use_tta))
    return SiteScores(list(samples), np.concatenate(logits).astype(np.float64), use_tta)


def file_list_sha256(samples: Sequence[Sample]) -> str:
    """sha256 over the sorted lines ``relpath<TAB>label<TAB>sha256 of the file``: the same images and labels give
    the same hash wherever the folder lives."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.relpath):
        h.update(f"{s.relpath}\t{s.label}\t{hashlib.sha256(s.path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _check_out(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise SiteError(f"--out {out} is the source folder; calibration writes a new folder and leaves the source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SiteError(f"{out} already exists and is not empty; choose another --out or delete it")


def _copy_folder(source: rf.RunFolder, dst: Path, out: Path) -> None:
    """The source's files into ``dst`` (copies: nothing the copy writes can reach the source), LEFT_OUT and
    temp files excepted; an ensemble's member paths rewritten relative to ``out``, the copy's final place."""
    ignore = lambda _dir, names: [n for n in names if n in LEFT_OUT or n.startswith(".")]
    shutil.copytree(source.path, dst, ignore=ignore, dirs_exist_ok=True)
    if source.is_ensemble:
        spec = source.read_json(rf.ENSEMBLE)
        for key in ("members", "inner"):
            if key in spec:
                spec[key] = [_ref(p, out) for p in source.members(key)]
        files.atomic_write_json(dst / rf.ENSEMBLE, spec)


def _ref(member: Path, out: Path) -> str:
    try:
        return Path(os.path.relpath(member.resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive: no relative path exists
        return str(member.resolve())


def _scores_csv(scores: SiteScores, probs: np.ndarray) -> str:
    buf = io.StringIO()
    buf.write("relpath,label,diagnosis,logit,probability\n")
    for s, z, p in zip(scores.samples, scores.logits, probs):
        buf.write(f"{s.relpath},{s.label},{s.diagnosis or ''},{z:.6f},{p:.6f}\n")
    return buf.getvalue()


def calibrate_run(
    run_dir: str | Path | None,
    site_spec: str | Path,
    out_dir: str | Path,
    policy: str = DEFAULT_POLICY,
    tta: bool | None = None,
    backend: str = "auto",
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Writes ``out_dir``: ``run_dir``'s model with temperature and threshold refitted on the site sample
    ``site_spec`` (any ``--data`` spec, read whole: ``data.sources.load_external``) with ``policy``; ``run_dir``
    None: the bundled model. ``tta`` None: as the source's operating point was fitted. Returns
    site_calibration.json's content. Raises SiteError (a sample too small for the policy, one class, an unreadable
    image, an ``out_dir`` in use), DataError (a bad spec), RunError (a source that cannot predict), PolicyError."""
    from lesionlab.data.sources import load_external
    from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor

    check_policy(policy)
    source_dir = Path(run_dir) if run_dir else DEFAULT_MODEL_DIR
    out = Path(out_dir)
    predictor = load_predictor(source_dir, backend=backend)  # RunError for a folder without an operating point
    source = rf.RunFolder(source_dir)
    old = source.require_operating_point()
    _check_out(source.path, out)
    site = load_external(site_spec, taxonomy)
    name = site.sources[0].name if site.sources else Path(str(site_spec)).name
    samples = site.test
    check_sample(np.asarray([s.label for s in samples]), policy, f"site sample {name}")  # before minutes of scoring
    scores = score_site(predictor, samples, tta, batch_size, progress)
    y = scores.labels
    fit = fit_site(y, scores.logits, policy, f"site sample {name}")
    probs = fit.probabilities(scores.logits)
    record: dict[str, Any] = {
        "site": {
            "name": name,
            "spec": str(site_spec),
            "n": fit.n,
            "n_malignant": fit.n_malignant,
            "n_benign": fit.n_benign,
            "file_list_sha256": file_list_sha256(samples),
        },
        "policy": policy,
        "tta": scores.tta,
        "temperature": fit.temperature,
        "threshold": fit.threshold,
        "source": {"path": str(source.path.resolve()), **old.to_dict()},
        "command": command,
        "sample_report": sample_report(y, scores.logits, fit, old.temperature, old.threshold),
    }
    op = rf.OperatingPoint(
        model_id=f"{old.model_id}-site-{name}",
        threshold=fit.threshold,
        policy=policy,
        temperature=fit.temperature,
        tta=scores.tta,
    )
    provenance = {k: record[k] for k in ("site", "source", "command")}
    _write(source, out, record, op, provenance, _scores_csv(scores, probs), y, probs, n_resamples, seed)
    return record


def _write(
    source: rf.RunFolder,
    out: Path,
    record: dict[str, Any],
    op: rf.OperatingPoint,
    provenance: dict[str, Any],
    scores_csv: str,
    y: np.ndarray,
    probs: np.ndarray,
    n_resamples: int,
    seed: int,
) -> None:
    """Builds the copy in a temp folder beside ``out``, then renames it onto ``out`` (absent or empty)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _copy_folder(source, tmp, out)
        copy = rf.RunFolder(tmp)
        section = report_section(record)
        for doc in sorted({*(p for p in tmp.iterdir() if p.suffix == ".md"), tmp / rf.REPORT}):
            text = doc.read_text() if doc.exists() else f"# lesionlab model {out.name}\n"
            files.atomic_write_text(doc, with_section(text, section))
        block = metrics_with_ci(y, probs, op.threshold, n_resamples, seed)
        copy.write_metrics(
            {
                "threshold": {
                    "policy": op.policy,
                    "value": op.threshold,
                    "chosen_on": f"site:{record['site']['name']}",
                },
                "calibration": {
                    "temperature": op.temperature,
                    "method": "temperature scaling on the site sample",
                    "site": record["sample_report"]["calibration"],
                },
                "tta": op.tta,
                "site": {**block, "note": "in sample: the images the operating point was fitted on"},
                "source_run": {"path": record["source"]["path"], "metrics": source.metrics()},
            }
        )
        files.atomic_write_text(tmp / rf.SITE_SCORES, scores_csv)
        copy.write_json(rf.SITE_CALIBRATION, record)
        copy.write_operating_point(op, provenance)  # last: from here on the folder is servable
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a model folder is for people to read
        try:
            os.rename(tmp, out)
        except OSError:
            raise SiteError(f"{out} appeared while calibrating and is not empty; choose another --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
