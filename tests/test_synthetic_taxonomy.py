"""The shipped query-pool taxonomy (paper section 3.1: 8 domains, 151 subcategories) and its loader."""

import json

import pytest

from duetgen.data.synthetic.dedup import NearDupConfig, dedup
from duetgen.data.synthetic.taxonomy import DEFAULT_TAXONOMY, TaxonomyError, load_taxonomy


def test_shipped_taxonomy_counts():
    tax = load_taxonomy()
    assert len(tax.domains) == 8
    assert tax.num_subcategories == 151
    names = {d.name for d in tax.domains}
    assert {"Home & Living", "Pets & Animal Care", "Cooking", "Transportation"} <= names
    for s in tax.subcategories():
        assert len(s.seeds) >= 3, s.id
        assert s.name not in s.siblings and len(s.siblings) == len(next(d for d in tax.domains if d.id == s.domain_id).subcategories) - 1
    seeds = [q for s in tax.subcategories() for q in s.seeds]
    assert len(seeds) == tax.num_seeds == len(set(seeds))


def test_seed_questions_are_not_near_duplicates_of_each_other():
    seeds = [q for s in load_taxonomy().subcategories() for q in s.seeds]
    kept, dropped = dedup(seeds, NearDupConfig(threshold=0.6))
    assert dropped == {}, [(seeds[i], seeds[j]) for i, j in dropped.items()]


def _write(tmp_path, doc):
    p = tmp_path / "tax.json"
    p.write_text(json.dumps(doc))
    return p


def _tiny():
    return {"name": "t", "version": "1", "domains": [
        {"id": "home", "name": "Home", "subcategories": [
            {"id": "cleaning", "name": "Cleaning", "seeds": ["How do I clean an oven?"]},
            {"id": "laundry", "name": "Laundry", "seeds": ["How do I wash wool?"]}]}]}


def test_loader_names_the_bad_entry(tmp_path):
    tax = load_taxonomy(_write(tmp_path, _tiny()))
    assert tax.subcategory("laundry").siblings == ["Cleaning"]

    d = _tiny()
    d["domains"][0]["subcategories"][1]["id"] = "cleaning"
    with pytest.raises(TaxonomyError, match="'cleaning' is used twice"):
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()
    d["domains"][0]["subcategories"][0]["seeds"] = []
    with pytest.raises(TaxonomyError, match="subcategory 'cleaning'.*seeds"):
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()
    d["domains"][0]["subcategories"][0]["examples"] = ["x"]
    with pytest.raises(TaxonomyError, match="unknown key"):
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()
    d["domains"][0]["subcategories"][0]["seeds"] = ["ok", 3]
    with pytest.raises(TaxonomyError, match=r"seeds\[1\]"):
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()  # an audit: a repeated seed passed, and `expand --seeds-only` wrote it twice
    seeds = d["domains"][0]["subcategories"][0]["seeds"]
    seeds.append(" " + seeds[0].upper())
    with pytest.raises(TaxonomyError, match=rf"seeds\[{len(seeds) - 1}\]: the question .* is given twice"):
        load_taxonomy(_write(tmp_path, d))
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TaxonomyError, match="not readable JSON"):
        load_taxonomy(tmp_path / "bad.json")


def test_loader_refuses_what_an_audit_slipped_past_it(tmp_path):
    import os

    d = _tiny()
    d["domains"][0]["subcategories"][0]["id"] = "cleaning\n"  # "$" matched before the newline
    with pytest.raises(TaxonomyError, match="must be a lowercase identifier"):
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()
    d["domains"][0]["subcategories"][1]["name"] = d["domains"][0]["subcategories"][0]["name"]
    with pytest.raises(TaxonomyError, match="have the same name"):  # each listed its own name as a sibling
        load_taxonomy(_write(tmp_path, d))
    d = _tiny()
    d["domains"][0]["description"] = {"a": 1}
    with pytest.raises(TaxonomyError, match="description must be a string"):
        load_taxonomy(_write(tmp_path, d))
    text = json.dumps(_tiny())
    (tmp_path / "dup.json").write_text(text[:-1] + ', "name": "other"}')
    with pytest.raises(TaxonomyError, match=r"key\(s\) \['name'\] given twice"):
        load_taxonomy(tmp_path / "dup.json")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(TaxonomyError, match="nested too deeply"):
        load_taxonomy(tmp_path / "deep.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(TaxonomyError, match="not a regular file"):
        load_taxonomy(tmp_path / "fifo.json")
    from typer.testing import CliRunner

    from duetgen.cli import app

    d = _tiny()
    d["domains"][0]["name"] = "Home [/] Living [red]x[/red]"  # rich markup raised MarkupError
    r = CliRunner().invoke(app, ["data", "taxonomy", "--file", str(_write(tmp_path, d))])
    assert r.exit_code == 0 and "Home [/] Living [red]x[/red]" in r.output, r.output


def test_default_path_is_the_package_data_file():
    assert DEFAULT_TAXONOMY.name == "taxonomy.json" and DEFAULT_TAXONOMY.parent.name == "synthetic"
