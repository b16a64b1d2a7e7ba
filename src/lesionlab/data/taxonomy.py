"""The diagnosis taxonomy: which diagnoses are malignant (label 1) and which benign (label 0).

Canonical codes are the HAM10000 / ISIC ones in lower case. Malignant: ``mel`` (melanoma), ``bcc`` (basal cell
carcinoma), ``scc`` (squamous cell carcinoma), ``akiec`` (actinic keratosis / intraepithelial carcinoma, ISIC 2019's
AK: a precursor that a screening tool must not call benign). Benign: ``nv`` (melanocytic nevi, PH2's common and
atypical nevi among them), ``bkl`` (benign keratosis: seborrheic keratosis, solar lentigo, lichenoid keratosis),
``df`` (dermatofibroma), ``vasc`` (vascular lesions), and the two rare ISIC 2020 diagnoses ``cafe`` (cafe-au-lait
macule) and ``amp`` (atypical melanocytic proliferation, benign in the ISIC 2020 ground truth).

Names are matched case-, space-, hyphen-, underscore- and apostrophe-insensitively ("Bowen's disease",
"bowens_disease"). "unknown" / "UNK" is deliberately absent: an unknown diagnosis raises ``DataError``, it is
never silently benign. A JSON file (``Taxonomy.from_file``) overrides or extends the default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lesionlab.errors import DataError

LABEL_NAMES = ("benign", "malignant")


def normalise(name: str) -> str:
    """The matching key of a diagnosis name: lower case, apostrophes dropped, runs of space/_/- as one space."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower().replace("'", "").replace("\u2019", "")).strip()


def parse_label(value: str | int) -> int:
    """0 or 1 from ``benign``/``malignant``/``0``/``1`` (also ``0.0``/``1.0``); ``DataError`` otherwise."""
    text = str(value).strip().lower()
    table = {"benign": 0, "malignant": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}
    if text not in table:
        raise DataError(f"label {value!r} is not benign/malignant/0/1")
    return table[text]


@dataclass(frozen=True)
class Taxonomy:
    """``codes``: canonical code -> label (0 benign, 1 malignant); ``aliases``: normalised name -> code.

    Immutable; ``extended`` and ``from_file`` return new ones."""

    codes: Mapping[str, int]
    aliases: Mapping[str, str]

    def __post_init__(self) -> None:
        codes = {normalise(c): int(v) for c, v in self.codes.items()}
        for code, value in codes.items():
            if value not in (0, 1):
                raise DataError(f"taxonomy code {code!r} has label {value!r}; expected 0 (benign) or 1 (malignant)")
        aliases = {normalise(a): normalise(c) for a, c in self.aliases.items()}
        bad = sorted(a for a, c in aliases.items() if c not in codes)
        if bad:
            raise DataError(f"taxonomy aliases {bad} point to codes it does not define; codes: {sorted(codes)}")
        # frozen: set through object.__setattr__ so the stored tables are the normalised, read-only copies
        object.__setattr__(self, "codes", MappingProxyType(codes))
        object.__setattr__(self, "aliases", MappingProxyType(aliases))

    def canonical(self, name: str) -> str:
        """The code of a diagnosis name or code; ``DataError`` naming it and the known codes when unknown."""
        key = normalise(name)
        if key in self.codes:
            return key
        if key in self.aliases:
            return self.aliases[key]
        raise DataError(
            f"unknown diagnosis {name!r}: not a code or alias of the taxonomy (codes: {', '.join(sorted(self.codes))}; "
            "an unknown diagnosis is never taken as benign). Add it with a taxonomy file (Taxonomy.from_file)"
        )

    def label(self, name: str) -> int:
        """1 for a malignant diagnosis, 0 for a benign one (any name ``canonical`` accepts)."""
        return self.codes[self.canonical(name)]

    def is_malignant(self, name: str) -> bool:
        return self.label(name) == 1

    def knows(self, name: str) -> bool:
        key = normalise(name)
        return key in self.codes or key in self.aliases

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in a run and read by ``from_dict``: codes as benign/malignant, and aliases."""
        return {
            "codes": {c: LABEL_NAMES[v] for c, v in sorted(self.codes.items())},
            "aliases": dict(sorted(self.aliases.items())),
        }

    def extended(self, codes: Mapping[str, str | int] | None = None, aliases: Mapping[str, str] | None = None):
        """A copy with ``codes`` added or relabelled and ``aliases`` added or redirected."""
        new_codes = dict(self.codes) | {c: parse_label(v) for c, v in (codes or {}).items()}
        new_aliases = dict(self.aliases)
        for code in new_codes:  # a name that becomes a code is no longer an alias of another one
            new_aliases.pop(normalise(code), None)
        new_aliases |= dict(aliases or {})
        return Taxonomy(new_codes, new_aliases)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Taxonomy | None = None) -> Taxonomy:
        """``{"codes": {code: "benign"|"malignant"}, "aliases": {name: code}, "extends": true}``.

        ``extends`` (default true) starts from ``base`` (default: ``DEFAULT_TAXONOMY``); false replaces it."""
        unknown = set(data) - {"codes", "aliases", "extends"}
        if unknown:
            raise DataError(f"taxonomy has unknown keys {sorted(unknown)}; expected codes, aliases, extends")
        codes, aliases = data.get("codes") or {}, data.get("aliases") or {}
        if not isinstance(codes, Mapping) or not isinstance(aliases, Mapping):
            raise DataError("taxonomy 'codes' and 'aliases' must be JSON objects")
        if data.get("extends", True):
            return (base or DEFAULT_TAXONOMY).extended(codes, aliases)
        return Taxonomy({c: parse_label(v) for c, v in codes.items()}, dict(aliases))

    @classmethod
    def from_file(cls, path: str | Path, base: Taxonomy | None = None) -> Taxonomy:
        """Reads a JSON taxonomy file (``from_dict``'s form); ``DataError`` naming the file when it is bad."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read taxonomy file {path}: {e}") from e
        if not isinstance(data, Mapping):
            raise DataError(f"taxonomy file {path} must hold a JSON object")
        try:
            return cls.from_dict(data, base)
        except DataError as e:
            raise DataError(f"taxonomy file {path}: {e}") from e


_ALIASES = {
    "mel": ["melanoma", "malignant melanoma", "melanoma in situ", "melanoma invasive", "lentigo maligna"],
    "bcc": ["basal cell carcinoma", "basalioma"],
    "scc": ["squamous cell carcinoma", "cutaneous squamous cell carcinoma", "keratoacanthoma"],
    "akiec": [
        "ak",
        "actinic keratosis",
        "actinic keratoses",
        "solar keratosis",
        "bowens disease",
        "bowen disease",
        "intraepithelial carcinoma",
        "actinic keratosis intraepithelial carcinoma",
    ],
    "nv": [
        "nevus",
        "naevus",
        "nevi",
        "melanocytic nevus",
        "melanocytic nevi",
        "melanocytic naevus",
        "common nevus",
        "atypical nevus",
        "dysplastic nevus",
        "blue nevus",
    ],
    "bkl": [
        "benign keratosis",
        "benign keratosis like lesion",
        "benign keratosis like lesions",
        "seborrheic keratosis",
        "seborrhoeic keratosis",
        "solar lentigo",
        "lentigo",
        "lentigo nos",
        "lichenoid keratosis",
        "lichen planus like keratosis",
        "lplk",
    ],
    "df": ["dermatofibroma"],
    "vasc": ["vascular lesion", "vascular lesions", "angioma", "hemangioma", "angiokeratoma", "pyogenic granuloma"],
    "cafe": ["cafe au lait macule", "café au lait macule"],
    "amp": ["atypical melanocytic proliferation"],
}

DEFAULT_TAXONOMY = Taxonomy(
    codes={"mel": 1, "bcc": 1, "scc": 1, "akiec": 1, "nv": 0, "bkl": 0, "df": 0, "vasc": 0, "cafe": 0, "amp": 0},
    aliases={alias: code for code, names in _ALIASES.items() for alias in names},
)
