"""Several datasets in one table: ``load_sources`` reads each source with its format adapter and unites them.

A spec names a source: ``path``, ``format:path`` where detection is ambiguous, and ``?key=value&...`` options
(``name=`` the source's name; ``ids=global|source``; ``skip_unlisted=1``; ``allow_unknown=1``; an adapter's own,
e.g. the generic CSV's column names). With several sources each relpath is prefixed by its source's name (the
folder's name, made unique) and ``Sample.source`` is set; a source's fixed test images stay test, all others form
the training pool.

Groups (images never split across train and validation) are the connected components of: shared lesion ids, shared
patient ids and shared image ids; the near-duplicate groups a source ships; identical files (same bytes) in two
sources; and the ``links`` passed in (pairs of relpaths, e.g. from a cross-source duplicate detector). Ids are
namespaced by source, except where a format says they are ISIC-Archive-wide (HAM10000 and the ISIC challenge sets
share ISIC_ image ids and HAM_/IL_ lesion ids: the same id there is the same image or lesion, whichever set it came
from); ``ids=global`` or ``ids=source`` in a spec overrides. A test image grouped with a training-pool image is
leaked: ``test_dedup`` drops it, as it drops the ``test_leaked_from_train.txt`` a folder source ships.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from lesionlab.data.dataset import DEFAULT_CLASSES, Dataset, Skipped, SourceInfo, load_dataset
from lesionlab.data.formats import FORMATS, ReadOptions, SourceRead, detect_format, read_source
from lesionlab.data.sample import Sample
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.errors import DataError

SOURCE_OPTIONS = ("name", "ids", "skip_unlisted", "allow_unknown")  # read here; the others go to the adapter
TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class SourceSpec:
    """One source: its folder, its format (None: detected), its name (None: the folder's) and options."""

    path: Path
    format: str | None = None
    name: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "&".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.format}:" if self.format else "") + str(self.path) + (f"?{opts}" if opts else "")


def parse_spec(spec: str | Path | SourceSpec) -> SourceSpec:
    """``[format:]path[?key=value&...]``; a ``Path`` is taken as a plain path. The prefix counts as a format only
    when it is one of ``FORMATS`` (so "C:/data" or "./a:b" stay paths)."""
    if isinstance(spec, SourceSpec):
        return spec
    if isinstance(spec, Path):
        return SourceSpec(spec)
    text, _, query = spec.partition("?")
    fmt, sep, rest = text.partition(":")
    fmt_name = fmt if sep and fmt in FORMATS else None
    path = Path(rest if fmt_name else text)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = {k for k in options if not k.isidentifier()}
    if unknown:
        raise DataError(f"bad option names {sorted(unknown)} in data spec {spec!r}; expected key=value&key=value")
    return SourceSpec(path, fmt_name, options.pop("name", None), options)


class UnionFind:
    """Disjoint sets over strings: ``union`` links two, ``components`` lists the sets of two or more."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression keeps later finds short
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self, members: Iterable[str]) -> list[list[str]]:
        by_root: dict[str, list[str]] = defaultdict(list)
        for m in members:
            by_root[self.find(m)].append(m)
        return sorted((sorted(c) for c in by_root.values() if len(c) > 1), key=lambda c: c[0])


@dataclass
class _Loaded:
    spec: SourceSpec
    name: str
    root: Path
    read: SourceRead
    global_ids: bool


def _read(spec: SourceSpec, taxonomy: Taxonomy, classes: tuple[str, str], skip_invalid: bool) -> _Loaded:
    root = spec.path.expanduser()
    adapter_options = {k: v for k, v in spec.options.items() if k not in SOURCE_OPTIONS}
    options = ReadOptions(
        taxonomy,
        classes,
        skip_invalid,
        skip_unlisted=spec.options.get("skip_unlisted", "").lower() in TRUE,
        allow_unknown=spec.options.get("allow_unknown", "").lower() in TRUE,
        options=adapter_options,
    )
    read = read_source(root, spec.format, options)
    ids = spec.options.get("ids")
    if ids not in (None, "global", "source"):
        raise DataError(f"ids={ids} in data spec {spec}: expected ids=global or ids=source")
    name = spec.name or root.resolve().name
    return _Loaded(spec, name, root, read, read.global_ids if ids is None else ids == "global")


def _unique_names(loaded: list[_Loaded]) -> None:
    """Folder names become relpath prefixes: a repeated one gets -2, -3 (``data/ham`` and ``other/ham``)."""
    seen: set[str] = set()
    for item in loaded:
        base, k = item.name, 1
        while item.name in seen:
            k += 1
            item.name = f"{base}-{k}"
        seen.add(item.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identical_files(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Sets of samples of different sources whose files hold the same bytes. Only files whose size occurs in two
    sources are hashed, so that a large set is not read whole on every load."""
    by_size: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_size[s.path.stat().st_size].append(s)
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for bucket in by_size.values():
        if len({s.source for s in bucket}) > 1:
            for s in bucket:
                by_hash[_sha256(s.path)].append(s)
    return [group for group in by_hash.values() if len({s.source for s in group}) > 1]


def _check_identical(
    groups: list[list[Sample]], skip_invalid: bool
) -> tuple[list[tuple[str, str]], set[str], list[Skipped]]:
    """Links for identical files; a fixed test image identical to a training-pool image of another source is an
    error (with ``skip_invalid``: the training copies are dropped and listed)."""
    links, dropped, problems = [], set(), []
    for group in groups:
        test = [s for s in group if s.split == "test"]
        train = [s for s in group if s.split != "test"]
        if test and train:
            problems.append((test[0].relpath, [s.relpath for s in train]))
            dropped |= {s.relpath for s in train}
        links += [(group[0].relpath, s.relpath) for s in group[1:]]
    if problems and not skip_invalid:
        shown = "; ".join(f"test image {t} = training image {', '.join(tr)}" for t, tr in problems[:10])
        raise DataError(
            f"{len(problems)} fixed test images are byte-identical to training images of another source: {shown}. "
            "Remove one copy, or pass skip_invalid to drop the training copies"
        )
    skipped = [Skipped(r, f"identical to the fixed test image {t}") for t, tr in problems for r in tr]
    return links, dropped, skipped


def _id_keys(item: _Loaded, s: Sample, own_relpath: str) -> list[str]:
    """The union-find keys of a sample's ids: namespaced by the source, or "isic" where ids are archive-wide."""
    ns = "isic" if item.global_ids else item.name
    image_id = item.read.image_ids.get(own_relpath)
    keys = [("lesion", s.lesion_id), ("patient", s.patient_id), ("image", image_id)]
    return [f"{kind}:{ns}:{value}" for kind, value in keys if value]


def _unite(
    loaded: list[_Loaded], prefixed: bool, links: Sequence[tuple[str, str]], skip_invalid: bool
) -> tuple[list[Sample], dict[str, int], frozenset[str], list[Skipped]]:
    """The united samples, groups, leaked test relpaths and skipped rows of the read sources."""
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    uf = UnionFind()
    leaked: set[str] = set()
    for item in loaded:
        pre = f"{item.name}/" if prefixed else ""
        own = [dataclasses.replace(s, relpath=pre + s.relpath, source=item.name) for s in item.read.samples]
        samples += own
        for original, s in zip(item.read.samples, own):
            for key in _id_keys(item, s, original.relpath):
                uf.union(key, s.relpath)
        skipped += [Skipped(pre + k.item, k.reason) for k in item.read.skipped]
        leaked |= {pre + r for r in item.read.leaked}
        for group in item.read.groups:
            for rel in group[1:]:
                uf.union(pre + group[0], pre + rel)
    known = {s.relpath for s in samples}
    unknown_links = sorted({r for pair in links for r in pair} - known)
    if unknown_links:
        raise DataError(f"duplicate links name {len(unknown_links)} images not in the data: {unknown_links[:10]}")
    same, dropped, skipped_same = _check_identical(identical_files(samples), skip_invalid)
    skipped += skipped_same
    for a, b in [*links, *same]:
        uf.union(a, b)
    samples = [s for s in samples if s.relpath not in dropped]
    components = uf.components(s.relpath for s in samples)
    groups = {rel: k for k, members in enumerate(components) for rel in members}
    pool_groups = {groups[s.relpath] for s in samples if s.split != "test" and s.relpath in groups}
    leaked |= {s.relpath for s in samples if s.split == "test" and groups.get(s.relpath, -1) in pool_groups}
    # a shipped near-duplicate group may list files not in the table (skipped, or a class not asked for)
    return samples, groups, frozenset(leaked & {s.relpath for s in samples}), skipped


def _common_root(roots: list[Path]) -> Path:
    return Path(os.path.commonpath([str(r.resolve()) for r in roots])) if len(roots) > 1 else roots[0]


def load_sources(
    specs: Sequence[str | Path | SourceSpec],
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    classes: tuple[str, str] = DEFAULT_CLASSES,
    skip_invalid: bool = False,
    links: Sequence[tuple[str, str]] = (),
    require_test: bool = True,
) -> Dataset:
    """The dataset table of one or more sources. One folder-layout source (and no links) gives exactly
    ``load_dataset(root, classes)``. ``skip_invalid`` skips bad rows instead of raising (``Dataset.skipped`` lists
    them); an empty training pool, a class missing from it, or (``require_test``) no fixed test image is an error.
    ``Dataset.root`` is the sources' common parent folder; a sample's ``path`` is where its file is."""
    parsed = [parse_spec(s) for s in specs]
    if not parsed:
        raise DataError("no data source given")
    classes = (classes[0], classes[1])
    first = parsed[0]
    if len(parsed) == 1 and not links and not first.options:
        root = first.path.expanduser()
        if (first.format or detect_format(root).name) == "folder":
            return load_dataset(root, classes)  # the single-folder run every earlier run and cache was keyed on
    loaded = [_read(s, taxonomy, classes, skip_invalid) for s in parsed]
    roots = [(item.root.resolve(), item.read.format) for item in loaded]
    repeated = sorted({str(r) for r, f in roots if roots.count((r, f)) > 1})
    if repeated:
        raise DataError(f"the same source is given twice: {', '.join(repeated)}")
    _unique_names(loaded)
    samples, groups, leaked, skipped = _unite(loaded, len(loaded) > 1, links, skip_invalid)
    train = [s for s in samples if s.split != "test"]
    test = [s for s in samples if s.split == "test"]
    names = ", ".join(item.name for item in loaded)
    for k, cls in enumerate(classes):
        if not any(s.label == k for s in train):
            raise DataError(f"the training pool ({names}) has no {cls} images; an empty split cannot be trained")
    if require_test and not test:
        raise DataError(
            f"no source fixes test images ({names}); add one that does (a folder layout, a CSV split column, "
            "an ISIC Test ground truth) or evaluate on an external set"
        )
    infos = [
        SourceInfo(item.name, item.root, item.read.format, str(item.spec), SourceInfo.count(own, classes))
        for item in loaded
        for own in [[s for s in samples if s.source == item.name]]
    ]
    return Dataset(_common_root([i.root for i in loaded]), classes, train, test, groups, leaked, infos, skipped)


def load_external(
    spec: str | Path | SourceSpec,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    classes: tuple[str, str] = DEFAULT_CLASSES,
    skip_invalid: bool = False,
) -> Dataset:
    """An external evaluation set, scored whole: ``test`` holds every row of the source whatever its split
    (``Sample.split`` still says it), ``train`` is empty; relpaths are the source's own, ``source`` is set."""
    item = _read(parse_spec(spec), taxonomy, (classes[0], classes[1]), skip_invalid)
    samples, groups, _, skipped = _unite([item], False, (), skip_invalid)
    info = SourceInfo(item.name, item.root, item.read.format, str(item.spec), SourceInfo.count(samples, classes))
    return Dataset(item.root, (classes[0], classes[1]), [], samples, groups, frozenset(), [info], skipped)
