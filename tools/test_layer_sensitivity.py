"""tools/layer_sensitivity.py's sensitivity file (issue 28, item 2), pytest.

Known answers: c of Δloss ≈ c·error² fitted through the origin on planted points that lie
exactly on c·e² gives c back; a layer whose loss fell fits c < 0 and is written as 0; a
non-finite c is one error. The bundled Fixtures/NAME.sensitivity.json are what the writer
makes from the measured points they carry. With a built smoe-compress, `compress --plan-only
--sensitivity` reads the file and records its values in the plan.

Skips, naming the package, without torch/transformers (layer_sensitivity.py measures with them).
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from optional_deps import h5py, np, torch, transformers  # noqa: F401
from optional_deps import needs_all as needs_transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

REPO = pathlib.Path(__file__).resolve().parent.parent
EXE = REPO / ".build" / "debug" / "smoe-compress"
FIXTURES = REPO / "Fixtures"


@needs_transformers
def test_fit_and_document(tmp_path):
    import layer_sensitivity as ls
    from eval_loss import UsageError

    pts = [{"groups": g, "layer_error": e, "delta_loss": 0.5 * e * e} for g, e in [(1, 0.6), (2, 0.4), (4, 0.2)]]
    assert math.isclose(ls.fit_quadratic(pts), 0.5, rel_tol=1e-12)
    fell = [{"groups": 1, "layer_error": 0.5, "delta_loss": -0.01}]
    rows = [{"layer": "a", "quadratic": ls.fit_quadratic(pts), "points": pts},
            {"layer": "b", "quadratic": ls.fit_quadratic(fell), "points": fell}]
    doc = ls.sensitivity_document("m.h5", rows, 4, [1, 2, 4])
    assert doc["format"] == "smoe-compress layer sensitivity" and doc["version"] == 1
    assert doc["layers"] == {"a": pytest.approx(0.5), "b": 0.0}
    out = tmp_path / "m.sensitivity.json"
    ls.write_sensitivity(out, doc)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert not (tmp_path / "m.sensitivity.json.tmp").exists()
    with pytest.raises(UsageError, match="not finite"):
        ls.sensitivity_document("m.h5", [{"layer": "a", "quadratic": float("nan")}])


@needs_transformers
@pytest.mark.parametrize("name", ["trained-mixtral", "trained-switch"])
def test_bundled_files_are_the_writers(name):
    import layer_sensitivity as ls

    doc = json.loads((FIXTURES / f"{name}.sensitivity.json").read_text())
    rows = [{"layer": layer, "quadratic": ls.fit_quadratic(pts), "points": pts} for layer, pts in doc["points"].items()]
    again = ls.sensitivity_document(doc["model"], rows, doc["every"], doc["settings"])
    assert json.loads(json.dumps(again)) == doc
    with h5py.File(FIXTURES / f"{name}.h5", "r") as f:
        assert sorted(doc["layers"]) == sorted(f["moe_layers"])


@needs_transformers
@pytest.mark.skipif(not EXE.exists(), reason=f"smoe-compress is not built ({EXE})")
def test_plan_reads_the_file():
    sens = FIXTURES / "trained-switch.sensitivity.json"
    r = subprocess.run([str(EXE), "compress", str(FIXTURES / "trained-switch.h5"), "--calib", str(FIXTURES / "trained-switch.calib.h5"),
                        "--target-size", "0.3", "--groups", "4", "--sensitivity", str(sens), "--plan-only", "--json", "--quiet",
                        "-o", "/nonexistent/never.h5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    want = json.loads(sens.read_text())["layers"]
    assert plan["sensitivity"]["layers"] == pytest.approx(want)
    assert plan["objective_value"] == pytest.approx(
        sum(want[l["name"]] * l["estimated_relative_error"] ** 2 for l in plan["layers"]), rel=1e-7)  # the JSON prints 9 significant digits
