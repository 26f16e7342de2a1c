"""`duetgen demo` (what `make demo` runs): a ShapeWorld set, its HTML view and the judge's sanity check."""

import json

from typer.testing import CliRunner

from duetgen.cli import app


def test_demo_writes_the_set_the_page_and_a_perfect_ground_truth_score(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    page = out / "shapeworld-test.html"
    assert page.is_file() and "toyworld-test-" in page.read_text()
    assert f"html view: {page.resolve()}" in result.output
    summary = json.loads((out / "judge-ground-truth.json").read_text())["summary"]["all"]
    scored = {k: v for k, v in summary.items() if isinstance(v, float)}
    assert scored and all(v == 1.0 for v in scored.values()), summary
    # a rerun starts clean instead of failing on the existing dataset
    assert CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "5"]).exit_code == 0
