"""Tests of tools/sequential_compress.py (pytest): the sequential calibration driver.

A tiny randomly initialised 3-layer Mixtral (no download) is imported with `smoe-compress import`
and compressed by the driver. The end-to-end tests need torch, transformers, h5py, numpy and the
debug binary, and skip saying which is missing; the refusals of the compact and pruned layouts run
everywhere.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from optional_deps import MISSING, h5py, np, torch, transformers  # noqa: F401
from optional_deps import needs_all as needs_capture_deps

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
SCRIPT = TOOLS / "sequential_compress.py"
CAPTURE = TOOLS / "capture_calibration.py"
EXE = REPO / ".build" / "debug" / "smoe-compress"
LAYERS = [f"model.layers.{i}.block_sparse_moe" for i in range(3)]
COMPRESS = ["--groups", "2"]


def run(*args, env=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)


def driver(d, out, *extra, opts=COMPRESS):
    return run(sys.executable, SCRIPT, d / "m.h5", "--text", d / "text.txt", "--tokens", "96", "--seq-len", "16",
               "--bin", EXE, "-o", out, *extra, "--", *opts)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if MISSING:
        pytest.skip(f"optional python packages missing: {', '.join(MISSING)}")
    if not EXE.exists():
        pytest.skip("smoe-compress is not built (swift build --product smoe-compress)")
    d = tmp_path_factory.mktemp("seq")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    transformers.MixtralForCausalLM(cfg).save_pretrained(d / "model")
    (d / "text.txt").write_text("Sparse mixture of experts models route each token to a few experts. " * 10)
    r = run(EXE, "import", d / "model", "-o", d / "m.h5", "--quiet")
    assert r.returncode == 0, r.stderr
    r = driver(d, d / "out.h5")
    assert r.returncode == 0, r.stderr
    return d


def layer_arrays(path, name):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(k, o):
            if isinstance(o, h5py.Dataset):
                out[k] = o[()]
        f["moe_layers"][name].visititems(visit)
        out["attrs"] = sorted((k, str(v)) for k, v in f["moe_layers"][name].attrs.items())
    return out


def capture_layers(path):
    with h5py.File(path, "r") as f:
        g = f["moe_layers"]
        return {n: {k: g[n][k][()] for k in ("hidden_states", "router_logits", "output")} for n in g}


@needs_capture_deps
def test_driver_writes_a_checkpoint_with_a_note(setup):
    out = setup / "out.h5"
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "smoe-checkpoint"
        history = json.loads(f.attrs["history"])
    compress = [h for h in history if h.get("stage") == "compress"]
    assert len(compress) == 3, history
    note = json.loads((setup / "out.h5.sequential.json").read_text())
    assert [s["layer"] for s in note["steps"]] == LAYERS
    assert note["sequential_calibration"]["targets"] == "reference"
    assert note["sequential_calibration"]["compress"] == COMPRESS
    assert not [p for p in setup.iterdir() if p.name.endswith(".tmp")]
    r = run(EXE, "stats", out, "--calib", setup / "out.h5.seq" / "step-2.calib.h5", "-o", setup / "s.h5", "--quiet")
    assert r.returncode == 0, r.stderr


@needs_capture_deps
def test_layer0_equals_one_shot_compress_on_the_plain_capture(setup, tmp_path):
    plain = tmp_path / "plain.h5"
    r = run(sys.executable, CAPTURE, setup / "model", "-o", plain, "--text", setup / "text.txt", "--tokens", "96",
            "--seq-len", "16", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    one = tmp_path / "one.h5"
    r = run(EXE, "compress", setup / "m.h5", "--layers", LAYERS[0], "--calib", plain, "--refit-targets", "capture",
            *COMPRESS, "-o", one, "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = layer_arrays(one, LAYERS[0]), layer_arrays(setup / "out.h5", LAYERS[0])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=False) if k != "attrs" else a[k] == b[k], k


@needs_capture_deps
def test_later_layers_are_calibrated_on_the_compressed_prefix(setup, tmp_path):
    work = setup / "out.h5.seq"
    plain = capture_layers(work / "step-0.calib.h5")  # the plain capture of the original
    for step in (1, 2):
        cap = capture_layers(work / f"step-{step}.calib.h5")
        assert np.array_equal(cap[LAYERS[0]]["hidden_states"], plain[LAYERS[0]]["hidden_states"])
        for n in LAYERS[1:]:  # from layer 1 on: inputs through compressed layers, outputs the original's
            assert not np.allclose(cap[n]["hidden_states"], plain[n]["hidden_states"]), (step, n)
            assert np.array_equal(cap[n]["output"], plain[n]["output"]), (step, n)
    # --targets shifted: the compressed model's own (original) block on the shifted inputs
    r = driver(setup, tmp_path / "shifted.h5", "--targets", "shifted", "--work-dir", tmp_path / "w")
    assert r.returncode == 0, r.stderr
    cap = capture_layers(tmp_path / "w" / "step-1.calib.h5")
    assert not np.allclose(cap[LAYERS[1]]["output"], plain[LAYERS[1]]["output"])


@needs_capture_deps
def test_rerun_reuses_finished_layers(setup, tmp_path):
    work = setup / "out.h5.seq"
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("step-*.h5")}
    first = (setup / "out.h5").read_bytes()
    r = driver(setup, setup / "out.h5")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("reusing") == 4, r.stderr  # the reference export and the 3 steps
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("step-*.h5")} == before
    assert (setup / "out.h5").read_bytes() == first
    # other compress settings: nothing but the reference export is reused
    r = driver(setup, tmp_path / "a.h5", "--work-dir", work, opts=["--groups", "3"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("reusing") == 1, r.stderr  # the reference export only


@pytest.mark.parametrize("opts, message", [
    (["--groups", "2", "--router", "compact"], "E-slot layout only (--router slots): --router compact"),
    (["--groups", "2", "--router=compact"], "E-slot layout only (--router slots): --router compact"),
    (["--groups", "2", "--prune", "reap"], "E-slot layout only: --prune"),
    (["--groups", "2", "--shard", "1/2"], "--shard cannot be used here"),
    (["--layers", "x"], "--layers cannot be used here"),
])
def test_compact_prune_and_shard_are_refused_in_one_line(tmp_path, opts, message):
    (tmp_path / "t.txt").write_text("x")
    r = run(sys.executable, SCRIPT, tmp_path / "m.h5", "--text", tmp_path / "t.txt", "--tokens", "8",
            "-o", tmp_path / "o.h5", "--", *opts)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o.h5").exists()


def test_bad_input_is_one_error_line(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    r = run(sys.executable, SCRIPT, tmp_path / "missing.h5", "--text", tmp_path / "t.txt", "--tokens", "8",
            "-o", tmp_path / "o.h5", "--", "--groups", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
