"""tools/eval_loss.py (issue 28, item 1), pytest.

Known answers: the fixtures' captures. The ORIGINAL trained fixtures, exported by smoe-compress
and loaded by transformers with eval_loss's config, are run on each capture's `/tokens`; every
MoE block's input must be the captured `hidden_states` up to their float16 rounding (this checks
the whole model below the block: embeddings, RoPE / relative buckets, heads, norms), and the block
run on the captured `hidden_states` must give the captured `output` to float32 rounding. The
held-out loss of the originals is pinned (every 8th window, so the test stays quick) and must be
the same twice. The text windows must be the captures' own bytes where a capture window starts.

Skips, saying why: without torch/transformers (named), without the fixtures' text
(`<repo>/../shared/fixtures/trained-text.txt`, named), without a built debug smoe-compress.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

from optional_deps import h5py, np, torch, transformers  # noqa: F401
from optional_deps import needs_all as needs_transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import eval_loss  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
EXE = REPO / ".build" / "debug" / "smoe-compress"
SCRIPT = REPO / "tools" / "eval_loss.py"
FIXTURES = REPO / "Fixtures"
TEXT = eval_loss.DEFAULT_TEXT
NAMES = ["trained-mixtral", "trained-switch"]
# Held-out loss (nats per predicted byte) of the original fixtures over every 8th window of the
# text's second half (94 windows), as measured by this tool; the full half (747 windows) gives
# 1.972797 (mixtral) and 2.447636 (switch).
PINNED_EVERY8 = {"trained-mixtral": 1.999436, "trained-switch": 2.407979}

needs_text = pytest.mark.skipif(not TEXT.is_file(), reason=f"the fixtures' text is absent: {TEXT} (../shared/fixtures/trained-text.txt)")
needs_exe = pytest.mark.skipif(not EXE.exists(), reason=f"smoe-compress is not built ({EXE}; swift build --product smoe-compress)")
needs_h5py = pytest.mark.skipif(h5py is None or np is None, reason="optional python packages missing: h5py/numpy")


def run_script(script, *args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=e)


def assert_one_error_line(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_arguments_give_one_error_line(tmp_path):
    assert_one_error_line(run_script(SCRIPT, tmp_path / "absent.h5"), "absent.h5", "not found")
    assert_one_error_line(run_script(SCRIPT))  # missing argument
    assert_one_error_line(run_script(SCRIPT, FIXTURES / "trained-mixtral.h5", "--every", "zero"), "--every")
    assert_one_error_line(run_script(SCRIPT, FIXTURES / "trained-mixtral.h5", "--text", tmp_path / "no.txt"), "no.txt")
    short = tmp_path / "short.txt"
    short.write_bytes(b"too short")
    assert_one_error_line(run_script(SCRIPT, FIXTURES / "trained-mixtral.h5", "--text", short), "short.txt", "95733")
    frontier = REPO / "tools" / "frontier.py"
    assert_one_error_line(run_script(frontier, "--sizes", "2"), "--sizes")
    assert_one_error_line(run_script(frontier, "--fixtures", "nope"), "nope.h5")


@needs_transformers
@needs_exe
@needs_text
def test_not_a_checkpoint_is_one_error_line(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5")
    assert_one_error_line(run_script(SCRIPT, bogus, "--exe", EXE), "bogus.h5", "export failed")


@needs_text
def test_without_torch_the_tool_names_what_is_missing():
    hidden = REPO / "tools" / "testing" / "without_torch"
    r = run_script(SCRIPT, FIXTURES / "trained-mixtral.h5", env={"PYTHONPATH": str(hidden)})
    assert_one_error_line(r, "missing: torch, transformers")


@needs_text
@needs_h5py
@pytest.mark.parametrize("name", NAMES)
def test_windows_are_the_second_half_and_match_the_captures(name):
    data = TEXT.read_bytes()
    heldout = eval_loss.read_heldout(TEXT)
    starts = eval_loss.window_starts(len(heldout))
    assert len(data) == 191_466 and len(heldout) == 95_733
    assert len(starts) == 747 and starts[0] == 0 and starts[-1] == 746 * 128
    for capture, byte_range in (("calib", [0, eval_loss.HELDOUT_START]), ("heldout", [eval_loss.HELDOUT_START, len(data)])):
        with h5py.File(FIXTURES / f"{name}.{capture}.h5", "r") as f:
            source = json.loads(f.attrs["source"])
            tokens = f["tokens"][:]
        assert source["text_byte_range"] == byte_range
        assert hashlib.sha256(data[byte_range[0] : byte_range[1]]).hexdigest() == source["text_sha256"]
        for w, s in enumerate(source["window_starts"]):
            assert list(data[s : s + 128]) == tokens[w].tolist()
    # The first evaluated window is the capture's first window.
    assert list(heldout[:128]) == tokens[0].tolist()


def blocks_of(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "SparseMLP"))]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def originals():
    """{name: (model, model_type, config patch)}: the original fixtures, exported and loaded."""
    if not EXE.exists():
        pytest.skip(f"smoe-compress is not built ({EXE})")
    if eval_loss.torch_modules is None:
        pytest.skip("eval_loss is not importable")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            folder = pathlib.Path(tmp) / name
            model_type, patch = eval_loss.export(FIXTURES / f"{name}.h5", folder, EXE)
            out[name] = (eval_loss.load(folder, model_type), model_type, patch)
    return out


@needs_transformers
@needs_exe
@pytest.mark.parametrize("capture", ["calib", "heldout"])
@pytest.mark.parametrize("name", NAMES)
def test_exported_original_reproduces_the_captures(originals, name, capture):
    model, model_type, _ = originals[name]
    blocks = blocks_of(model)
    seen = {}

    def hook(block):
        def h(module, inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            seen[block] = (inputs[0].reshape(-1, 64).numpy().copy(), y.reshape(-1, 64).numpy().copy())
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in blocks]
    with h5py.File(FIXTURES / f"{name}.{capture}.h5", "r") as f:
        tokens = f["tokens"][:].tolist()
        layers = sorted(f["moe_layers"], key=lambda n: int(f["moe_layers"][n].attrs["index"]))
        captured = [(f["moe_layers"][l]["hidden_states"][:].astype(np.float32), f["moe_layers"][l]["output"][:]) for l in layers]
    inputs, _ = eval_loss.model_inputs(torch, model_type, tokens)
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    # Encoder blocks run before decoder blocks: module order is the checkpoint's layer index.
    assert len(blocks) == len(captured) == 4
    for (n, m), (x_cap, y_cap) in zip(blocks, captured):
        x, y = seen[n]
        assert x.shape == x_cap.shape
        # The model's own block input is the captured one up to float16 rounding (half an ulp,
        # 2^-11 relative; the Frobenius ratio sits at about 2.1e-4) ...
        assert rel(x, x_cap) < 3e-4, (n, rel(x, x_cap))
        assert np.mean(x.astype(np.float16).astype(np.float32) == x_cap) > 0.99, n
        # ... and its output is the captured one token by token, up to what that rounding does
        # downstream: the odd token whose top-k choice it flips (2 of 1024 in Switch's layer 1).
        rows = np.linalg.norm(y - y_cap, axis=1) / np.linalg.norm(y_cap, axis=1)
        assert np.mean(rows < 1e-2) >= 0.99, (n, np.mean(rows < 1e-2))
        # The block on exactly the captured input gives the captured output to float32 rounding.
        with torch.no_grad():
            out = m(torch.from_numpy(x_cap)[None])
        out = (out[0] if isinstance(out, tuple) else out).reshape(-1, 64).numpy()
        assert rel(out, y_cap) < 1e-6, (n, rel(out, y_cap))


@needs_transformers
@needs_exe
def test_export_config_is_patched_to_the_fixture(originals):
    mixtral = originals["trained-mixtral"][0].config
    assert (mixtral.num_attention_heads, mixtral.num_key_value_heads, mixtral.head_dim) == (4, 2, 16)
    assert mixtral.rms_norm_eps == 1e-5
    switch = originals["trained-switch"][0].config
    assert switch.tie_word_embeddings and switch.decoder_start_token_id == 256
    assert (switch.relative_attention_num_buckets, switch.relative_attention_max_distance, switch.layer_norm_epsilon) == (32, 128, 1e-6)


@needs_transformers
@needs_exe
@needs_text
@pytest.mark.parametrize("name", NAMES)
def test_loss_of_the_original_is_pinned_and_stable(originals, name):
    model, model_type, _ = originals[name]
    ev = eval_loss.Evaluator(TEXT, EXE, every=8)
    assert len(ev.windows) == 94
    first, count = eval_loss.mean_loss(model, model_type, ev.windows)
    again, _ = eval_loss.mean_loss(model, model_type, ev.windows, batch=17)
    assert count == 94 * (127 if model_type == "mixtral" else 64)
    assert abs(first - again) < 1e-7  # another batch size: float32 summation order only
    assert first == pytest.approx(PINNED_EVERY8[name], abs=2e-5)


# Expert bytes of the originals exported as block-scaled FP8 (issue 28): one byte per weight, as
# the float16 export's half, plus one float32 scale per 128 × 128 block — every fixture matrix
# (64 × 128 or 128 × 64) is one block: 8 experts × 3 (mixtral: gate, up, down) or 2 (switch: wi,
# wo) matrices × 4 layers × 4 bytes.
FP8_EXPERT_BYTES = {"trained-mixtral": 1_572_864 // 2 + 8 * 3 * 4 * 4, "trained-switch": 1_048_576 // 2 + 8 * 2 * 4 * 4}


@needs_transformers
@needs_exe
@needs_text
@pytest.mark.parametrize("name", NAMES)
def test_fp8_export_halves_the_experts_and_keeps_the_loss(name):
    """`--export-dtype f8-block`: the folder transformers loads holds half the expert bytes, and the
    held-out loss of the FP8 model is within 1e-3 nats of the original's (measured: +0.00019 mixtral,
    +0.00024 switch, every 8th window). The bound is ~5x those: e4m3 keeps 4 significant bits, so
    each weight moves by up to 2^-5 of its value; a scale the loader ignored or misplaced moves the
    loss by nats, not thousandths."""
    ev = eval_loss.Evaluator(TEXT, EXE, every=8, export_dtype="f8-block")
    r = ev.evaluate(FIXTURES / f"{name}.h5")
    assert r["export_dtype"] == "f8-block"
    assert r["exported_expert_bytes"] == FP8_EXPERT_BYTES[name]
    assert r["loss_nats_per_byte"] == pytest.approx(PINNED_EVERY8[name], abs=1e-3)
    assert abs(r["loss_nats_per_byte"] - PINNED_EVERY8[name]) > 2e-5  # the weights did change (pinned to 1e-6)


@needs_transformers
@needs_exe
@needs_text
def test_half_size_plan_with_fp8_options_stays_within_two_percent(tmp_path):
    """Issue 28's half-size criterion on trained-mixtral, the fixture where no plan of merges and
    factorings came within 2 % (+11 %, ALGORITHM.md §4.3): `compress --target-size 0.5 --fp8
    --sensitivity` stores every layer's experts in FP8 (one merged to 7 experts to pay for the
    block scales), and the model as served -- exported under `auto`, which writes the stored FP8
    codes -- is within 2 % of the original's loss (measured +0.002 %, every 4th window). Its
    exported experts are the FP8 original's size: the merged layer exports one expert per slot."""
    out = tmp_path / "half.h5"
    r = subprocess.run([str(EXE), "compress", FIXTURES / "trained-mixtral.h5", "--calib", FIXTURES / "trained-mixtral.calib.h5",
                        "--target-size", "0.5", "--fp8", "--sensitivity", FIXTURES / "trained-mixtral.sensitivity.json",
                        "-o", out, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["report"]["expert_bytes_final"] <= 1_572_864 // 2
    assert all(layer.get("expert_encoding") == "f8-block 128x128" for layer in report["plan"]["layers"])
    result = eval_loss.Evaluator(TEXT, EXE, every=8).evaluate(out)
    assert result["exported_expert_bytes"] == FP8_EXPERT_BYTES["trained-mixtral"]
    assert result["loss_nats_per_byte"] <= 1.02 * PINNED_EVERY8["trained-mixtral"]
