"""What a run reads, leak-proof across sources, and how to read it again from the run's record.

One source is read as it always was (a folder of today's layout is exactly ``load_dataset``). Several sources
are united by ``sources.load_sources`` and then searched for the same images across sources (``duplicates``):
each match links the two into one group, so validation never splits them and a test image matching a training
image drops out of ``test_dedup``. ``data_record`` is what config.json's ``data`` block says about it;
``dataset_from_record`` reads the same dataset again for evaluation, export and refusal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lesionlab.data.dataset import DEFAULT_CLASSES, Dataset
from lesionlab.data.sources import load_sources, parse_spec
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy

Specs = str | Path | Sequence[str | Path]


def as_specs(data: Specs) -> list[str | Path]:
    return [data] if isinstance(data, str | Path) else list(data)


def load_training_data(
    data: Specs,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    classes: tuple[str, str] = DEFAULT_CLASSES,
    skip_invalid: bool = False,
    detect_duplicates: bool = True,
    progress: bool = True,
) -> Dataset:
    """The dataset of one or several sources (``sources.parse_spec`` forms); with several, cross-source
    duplicates found by ``duplicates.find_duplicates`` are linked into groups (``Dataset.duplicate_pairs`` says
    how many)."""
    specs = as_specs(data)
    dataset = load_sources(specs, taxonomy, classes, skip_invalid)
    if len(specs) < 2 or not detect_duplicates:
        return dataset
    links = cross_source_links(dataset, progress)
    linked = load_sources(specs, taxonomy, classes, skip_invalid, links=links)
    linked.duplicate_pairs = len(links)
    return linked


def cross_source_links(dataset: Dataset, progress: bool = True) -> list[tuple[str, str]]:
    """Pairs of the same photo in two sources, searched once per file list (and detector version): kept in the
    duplicate cache, since a run's evaluation, refusal and export read its data again."""
    import hashlib
    import json

    from lesionlab.data.duplicates import SIGNATURE_VERSION, Thresholds, default_cache, find_duplicates
    from lesionlab.files import atomic_write_json

    key = hashlib.sha256(f"{SIGNATURE_VERSION}|{Thresholds()}|{dataset.file_list_hash()}".encode()).hexdigest()[:24]
    path = default_cache() / "links" / f"{key}.json"
    if path.exists():
        return [(a, b) for a, b in json.loads(path.read_text())]
    pairs = find_duplicates(dataset.all, across_sources=True, progress=progress)
    links = [(p.a, p.b) for p in pairs]
    atomic_write_json(path, links)
    return links


def data_record(
    data: Specs, dataset: Dataset, taxonomy: Taxonomy = DEFAULT_TAXONOMY, skip_invalid: bool = False
) -> dict[str, Any]:
    """What config.json's ``data`` block records beyond the split: the root (the first source, as runs of one
    folder always recorded), the specs to read the data again, each source's counts, the taxonomy, the number
    of cross-source duplicate pairs linked, and ``skip_invalid`` when invalid rows were skipped (so that reading
    the data again skips the same rows)."""
    specs = as_specs(data)
    out: dict[str, Any] = {"root": str(Path(parse_spec(specs[0]).path).resolve())}
    if len(specs) > 1 or str(specs[0]) != str(parse_spec(specs[0]).path):  # several, or a format / options given
        out["specs"] = [str(s) for s in specs]
    out["sources"] = [info.to_dict() for info in dataset.sources]
    out["taxonomy"] = taxonomy.to_dict()
    if len(specs) > 1:
        out["duplicate_pairs_linked"] = dataset.duplicate_pairs
    if skip_invalid:
        out["skip_invalid"] = True
        out["invalid_rows_skipped"] = len(dataset.skipped)
    return out


def dataset_from_record(record: Mapping[str, Any], data: Specs | None = None, progress: bool = True) -> Dataset:
    """The dataset a run was trained on, read again from config.json's ``data`` block (``data`` overrides where
    it lies, e.g. on another machine); the duplicate signatures are cached, so the search is quick."""
    classes = tuple(record.get("classes", DEFAULT_CLASSES))
    taxonomy = Taxonomy.from_dict(record["taxonomy"]) if "taxonomy" in record else DEFAULT_TAXONOMY
    specs: Specs = data if data is not None else record.get("specs") or record["root"]
    skip = bool(record.get("skip_invalid", False))
    return load_training_data(specs, taxonomy, (classes[0], classes[1]), skip_invalid=skip, progress=progress)
