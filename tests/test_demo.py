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
    # an audit: a rerun deleted `generated/` and `shapeworld-test/` whatever they held; a folder of the
    # user's there is refused now, and nothing of it is lost
    (out / "generated" / "thesis.txt").write_text("mine")
    refused = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "5"])
    assert refused.exit_code == 2 and "is not a folder the demo wrote" in refused.output
    assert (out / "generated" / "thesis.txt").read_text() == "mine"
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    refused = CliRunner().invoke(app, ["demo", "--out", str(blocked / "demo"), "--n", "5"])
    assert refused.exit_code == 2 and "error: demo --out" in refused.output  # a traceback before
