import json

import pytest

from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy, parse_label
from lesionlab.errors import DataError


@pytest.mark.parametrize(
    "name,code,label",
    [
        ("MEL", "mel", 1),
        ("Melanoma", "mel", 1),
        ("melanoma", "mel", 1),
        ("AK", "akiec", 1),
        ("AKIEC", "akiec", 1),
        ("actinic keratosis", "akiec", 1),
        ("Bowen's disease", "akiec", 1),
        ("SCC", "scc", 1),
        ("basal_cell_carcinoma", "bcc", 1),
        ("NV", "nv", 0),
        ("melanocytic  nevus", "nv", 0),
        ("atypical_nevus", "nv", 0),  # PH2
        ("common_nevus", "nv", 0),
        ("seborrheic keratosis", "bkl", 0),
        ("Solar-Lentigo", "bkl", 0),
        ("lentigo NOS", "bkl", 0),  # ISIC 2020
        ("lichenoid keratosis", "bkl", 0),
        ("DF", "df", 0),
        ("VASC", "vasc", 0),
        ("cafe-au-lait macule", "cafe", 0),
    ],
)
def test_aliases_of_the_public_sets_map_to_codes(name, code, label):
    assert DEFAULT_TAXONOMY.canonical(name) == code
    assert DEFAULT_TAXONOMY.label(name) == label
    assert DEFAULT_TAXONOMY.is_malignant(code) is bool(label)


@pytest.mark.parametrize("name", ["unknown", "UNK", "psoriasis", ""])
def test_unknown_diagnosis_is_an_error_naming_it_never_benign(name):
    with pytest.raises(DataError, match=rf"unknown diagnosis '{name}'.*codes: akiec, amp, bcc"):
        DEFAULT_TAXONOMY.label(name)


def test_to_dict_round_trips_and_names_labels():
    d = DEFAULT_TAXONOMY.to_dict()
    assert d["codes"]["mel"] == "malignant" and d["codes"]["nv"] == "benign"
    assert d["aliases"]["bowens disease"] == "akiec"
    assert Taxonomy.from_dict(d | {"extends": False}) == DEFAULT_TAXONOMY


def test_file_overrides_and_extends_the_default(tmp_path):
    path = tmp_path / "taxonomy.json"
    path.write_text(
        json.dumps({"codes": {"akiec": "benign", "sk": "benign"}, "aliases": {"Psoriasis": "sk", "melanoma": "mel"}})
    )
    tax = Taxonomy.from_file(path)
    assert tax.label("AK") == 0  # relabelled, its aliases kept
    assert tax.canonical("psoriasis") == "sk" and tax.label("psoriasis") == 0
    assert tax.label("MEL") == 1 and DEFAULT_TAXONOMY.label("AK") == 1  # the default is untouched
    replaced = Taxonomy.from_dict({"codes": {"mel": 1, "nv": 0}, "extends": False})
    with pytest.raises(DataError, match="unknown diagnosis 'bcc'"):
        replaced.label("bcc")


def test_bad_taxonomy_files_name_the_problem(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"aliases": {"x": "nope"}}))
    with pytest.raises(DataError, match=r"t\.json.*point to codes it does not define"):
        Taxonomy.from_file(path)
    path.write_text(json.dumps({"codes": {"x": "maybe"}}))
    with pytest.raises(DataError, match="'maybe' is not benign/malignant/0/1"):
        Taxonomy.from_file(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read taxonomy file"):
        Taxonomy.from_file(path)


def test_parse_label():
    assert [parse_label(v) for v in ("benign", "Malignant", "0", "1", "1.0", 0)] == [0, 1, 0, 1, 1, 0]
    with pytest.raises(DataError):
        parse_label("2")
