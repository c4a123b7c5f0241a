"""Tests of tools/capture_calibration.py (pytest). The capture tests need torch, transformers,
h5py and numpy and skip, each saying which is missing, without them; the command-line checks
run everywhere.

A tiny randomly initialised Mixtral is built from a config (no download), saved with
save_pretrained, and captured; the file must follow docs/FORMAT.md section 2 with the layer
names `smoe-compress import` gives, and its router logits must be the router applied to the
recorded inputs. When the smoe-compress binary is built, the capture is also checked against
the imported checkpoint (`smoe-compress stats` accepts it only if every layer matches).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from optional_deps import MISSING, h5py, np, optional, torch, transformers  # noqa: F401
from optional_deps import needs_all as needs_capture_deps

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
SCRIPT = TOOLS / "capture_calibration.py"


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    transformers.MixtralForCausalLM(cfg).save_pretrained(d / "model")
    (d / "text.txt").write_text("Sparse mixture of experts models route each token to a few experts. " * 10)
    return d


def run_capture(d, *extra):
    out = d / "calib.h5"
    r = subprocess.run([sys.executable, str(SCRIPT), str(d / "model"), "-o", str(out), "--text", str(d / "text.txt"), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@needs_capture_deps
def test_capture_writes_format_section_2(tiny_mixtral):
    out = run_capture(tiny_mixtral, "--tokens", "50", "--seq-len", "16", "--batch-size", "3")
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "smoe-calibration"
        assert int(f.attrs["format_version"]) == 1
        assert json.loads(f.attrs["source"])["tokens"] == 50
        names = list(f["moe_layers"])
        assert names == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
        from safetensors.numpy import load_file
        weights = load_file(str(tiny_mixtral / "model" / "model.safetensors"))
        for i, n in enumerate(names):
            g = f["moe_layers"][n]
            assert int(g.attrs["index"]) == i
            x, z, y = g["hidden_states"][()], g["router_logits"][()], g["output"][()]
            # 50 real tokens: the padded rows of the last batch are not recorded.
            assert x.shape == (50, 16) and z.shape == (50, 4) and y.shape == (50, 16)
            assert x.dtype == np.float32
            assert np.allclose(z, x @ weights[n + ".gate.weight"].T, atol=1e-5)
            assert np.isfinite(y).all() and np.abs(y).sum() > 0


@needs_capture_deps
def test_padding_is_excluded_and_batching_does_not_change_rows(tiny_mixtral):
    a = run_capture(tiny_mixtral, "--tokens", "40", "--seq-len", "16", "--batch-size", "1")
    with h5py.File(a, "r") as f:
        xa = f["moe_layers/model.layers.1.block_sparse_moe/hidden_states"][()]
    b = run_capture(tiny_mixtral, "--tokens", "40", "--seq-len", "16", "--batch-size", "3")
    with h5py.File(b, "r") as f:
        xb = f["moe_layers/model.layers.1.block_sparse_moe/hidden_states"][()]
    assert xa.shape == xb.shape == (40, 16)
    assert np.allclose(xa, xb, atol=1e-5)


@needs_capture_deps
def test_matches_imported_checkpoint(tiny_mixtral, tmp_path):
    exe = REPO / ".build" / "debug" / "smoe-compress"
    if not exe.exists():
        pytest.skip("smoe-compress is not built")
    calib = run_capture(tiny_mixtral, "--tokens", "30", "--seq-len", "16")
    h5 = tmp_path / "mixtral.h5"
    r = subprocess.run([str(exe), "import", str(tiny_mixtral / "model"), "-o", str(h5), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe), "stats", str(h5), "--calib", str(calib), "-o", str(tmp_path / "s.h5"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_unsupported_model_fails_with_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "t.txt").write_text("x")
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "m"), "-o", str(tmp_path / "c.h5"), "--text", str(tmp_path / "t.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "llama" in r.stderr
    assert not (tmp_path / "c.h5").exists()


@needs_capture_deps
def test_exported_folder_loads_in_transformers(tiny_mixtral, tmp_path):
    """import → export gives a folder transformers loads with the same logits."""
    exe = REPO / ".build" / "debug" / "smoe-compress"
    if not exe.exists():
        pytest.skip("smoe-compress is not built")
    h5, out = tmp_path / "m.h5", tmp_path / "exported"
    for args in (["import", str(tiny_mixtral / "model"), "-o", str(h5)], ["export", str(h5), "-o", str(out), "--max-shard-size", "20KB"]):
        r = subprocess.run([str(exe), *args, "--quiet"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists()
    ids = torch.arange(20).reshape(1, 20) % 64
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(tiny_mixtral / "model")(ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(a, b)


def test_without_torch_capture_is_one_error_line(tmp_path):
    """A supported model on a machine without torch: one line saying what to install, no traceback."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "t.txt").write_text("x")
    env = dict(os.environ, PYTHONPATH=str(TOOLS / "testing" / "without_torch"))
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "m"), "-o", str(tmp_path / "c.h5"), "--text", str(tmp_path / "t.txt")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("error: capture needs the python packages") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "c.h5").exists()
