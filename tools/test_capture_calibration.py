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
    """The capture's main() with these arguments in this process (torch and transformers imported
    once for the suite; the command line itself is checked by the tests that run the script)."""
    import capture_calibration
    out = d / "calib.h5"
    capture_calibration.main([str(d / "model"), "-o", str(out), "--text", str(d / "text.txt"), *extra])
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
    h5 = tmp_path / "mixtral.h5"
    r = subprocess.run([str(exe), "import", str(tiny_mixtral / "model"), "-o", str(h5), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for mode in ("--no-layerwise", "--layerwise"):
        calib = run_capture(tiny_mixtral, "--tokens", "30", "--seq-len", "16", mode)
        r = subprocess.run([str(exe), "stats", str(h5), "--calib", str(calib), "-o", str(tmp_path / "s.h5"), "--quiet"],
                           capture_output=True, text=True)
        assert r.returncode == 0, (mode, r.stderr)


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


# ---------------------------------------------------------------------------------------------
# Layer-by-layer capture (--layerwise) and sequential calibration (--reference, --targets)

def tiny_configs():
    """A tiny random model of every family the capture supports (transformers config classes, no
    download). Sizes are multiples of 16 bytes where transformers' grouped expert kernel needs it.
    DeepSeek-MoE v1 (`deepseek`) has no class in transformers (remote code only) and is not here."""
    common = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    t = transformers
    return {
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(
            **common, intermediate_size=24, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": lambda: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])),
        "qwen3_moe": lambda: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
            num_experts_per_tok=2, head_dim=8)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)),
        "deepseek_v2": lambda: t.DeepseekV2ForCausalLM(t.DeepseekV2Config(
            **common, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1)),
        "deepseek_v3": lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **common, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, routed_scaling_factor=1.0)),
        "switch_transformers": lambda: t.SwitchTransformersForConditionalGeneration(t.SwitchTransformersConfig(
            vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
            encoder_sparse_step=2, decoder_sparse_step=2, relative_attention_num_buckets=8)),
        # Issue 24's families (their routing is checked against transformers in test_families.py).
        "glm4_moe": lambda: t.Glm4MoeForCausalLM(t.Glm4MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, first_k_dense_replace=1, head_dim=8)),
        "minimax_m2": lambda: t.MiniMaxM2ForCausalLM(t.MiniMaxM2Config(
            **common, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
            head_dim=8, rotary_dim=4)),
        "gpt_oss": lambda: t.GptOssForCausalLM(t.GptOssConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
            head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
        "qwen3_next": lambda: t.Qwen3NextForCausalLM(t.Qwen3NextConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
            num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, head_dim=8, linear_num_value_heads=2,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"])),
        "ernie4_5_moe": lambda: t.Ernie4_5_MoeForCausalLM(t.Ernie4_5_MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=1, head_dim=8)),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "switch_transformers",
            "glm4_moe", "minimax_m2", "gpt_oss", "qwen3_next", "ernie4_5_moe"]
# Families whose decoder may sit inside a multimodal wrapper: their tiny models (wrapper and
# text-only) and the layer-wise == whole-model check are in test_families.py.
WHOLE_MODEL_ONLY = {"qwen3_5_moe", "qwen3_5_moe_text", "llama4", "llama4_text"}


def test_tiny_models_cover_the_family_table():
    """Every model_type of tools/model_families.json has a tiny model here, but `deepseek` (v1: no
    transformers class; captured with trust_remote_code models only, which this test cannot build)."""
    table = json.loads((TOOLS / "model_families.json").read_text())["families"]
    # kimi_k2 is DeepSeek-V3's architecture under another model_type, with no transformers class.
    assert {t for f in table for t in f["model_types"]} - {"deepseek", "kimi_k2"} == set(FAMILIES) | WHOLE_MODEL_ONLY


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "text.txt").write_text("Sparse mixture of experts models route each token to a few experts. " * 10)
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            tiny_configs()[name]().save_pretrained(root / name)
            made[name] = root / name
        return made[name]
    get.root = root
    return get


def capture_in_process(model, out, text, *extra):
    """Runs the capture's main() in this process (importing torch and transformers once for all
    tests); failures are SystemExit with the error line on stderr."""
    import capture_calibration
    capture_calibration.main([str(model), "-o", str(out), "--text", str(text), "--tokens", "50", "--seq-len", "16",
                              "--batch-size", "3", *extra])
    return out


def read_capture(path):
    with h5py.File(path, "r") as f:
        return {n: {k: f["moe_layers"][n][k][()] for k in ("hidden_states", "router_logits", "output")}
                for n in f["moe_layers"]}, [int(f["moe_layers"][n].attrs["index"]) for n in f["moe_layers"]], \
            json.loads(f.attrs["source"])


@needs_capture_deps
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_equals_whole_model(tiny_models, tmp_path, family, dtype):
    """The layer-wise capture runs each decoder layer on the same batches with the arguments the
    model's own forward builds, so it equals the whole-model capture to the bit (same kernels, same
    inputs), in float32 and bfloat16."""
    model, text = tiny_models(family), tiny_models.root / "text.txt"
    whole, w_index, w_src = read_capture(capture_in_process(model, tmp_path / "w.h5", text, "--dtype", dtype, "--no-layerwise"))
    layer, l_index, l_src = read_capture(capture_in_process(model, tmp_path / "l.h5", text, "--dtype", dtype, "--layerwise"))
    assert (w_src["mode"], l_src["mode"]) == ("whole-model", "layerwise")
    assert list(whole) == list(layer) and w_index == l_index and whole
    for name in whole:
        for k in ("hidden_states", "router_logits", "output"):
            assert whole[name][k].shape[0] == 50
            assert np.array_equal(whole[name][k], layer[name][k]), (name, k)


def perturbed_copy(src, dst, scale=0.05):
    """The model at src with every attention and expert weight of the first decoder layer perturbed."""
    from safetensors.torch import load_file, save_file
    import shutil
    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    hit = 0
    for k in sorted(w):
        if (".layers.0." in k or "encoder.block.0." in k) and k.endswith(".weight") and w[k].dim() == 2:
            w[k] = w[k] + scale * torch.randn(w[k].shape, generator=g, dtype=w[k].dtype)
            hit += 1
    assert hit
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@needs_capture_deps
@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_reference_capture(tiny_models, tmp_path, family):
    """--reference: inputs and router logits of the given model, output of the original's block on
    the original's own inputs for the same tokens."""
    orig, text = tiny_models(family), tiny_models.root / "text.txt"
    pert = perturbed_copy(orig, tmp_path / "perturbed")
    plain_o, _, _ = read_capture(capture_in_process(orig, tmp_path / "o.h5", text, "--layerwise"))
    plain_p, _, _ = read_capture(capture_in_process(pert, tmp_path / "p.h5", text, "--layerwise"))

    same, _, src = read_capture(capture_in_process(orig, tmp_path / "s.h5", text, "--reference", str(orig)))
    assert src["targets"] == "reference" and src["reference"] == str(orig.resolve()) and src["mode"] == "layerwise"
    for name in plain_o:
        for k in ("hidden_states", "router_logits", "output"):
            assert np.array_equal(same[name][k], plain_o[name][k]), (name, k)

    seq, _, src = read_capture(capture_in_process(pert, tmp_path / "q.h5", text, "--reference", str(orig)))
    shifted, _, src_s = read_capture(capture_in_process(pert, tmp_path / "r.h5", text, "--reference", str(orig),
                                                        "--targets", "shifted"))
    assert src_s["targets"] == "shifted"
    for name in plain_o:
        assert not np.allclose(seq[name]["hidden_states"], plain_o[name]["hidden_states"], atol=1e-3), name
        for k in ("hidden_states", "router_logits"):
            assert np.array_equal(seq[name][k], plain_p[name][k]), (name, k)
            assert np.array_equal(shifted[name][k], plain_p[name][k]), (name, k)
        assert np.array_equal(seq[name]["output"], plain_o[name]["output"]), name
        assert np.array_equal(shifted[name]["output"], plain_p[name]["output"]), name


def run_script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("extra,message", [
    (["--targets", "reference"], "--targets reference needs --reference"),
    (["--reference", "REF", "--no-layerwise"], "cannot be combined with --no-layerwise"),
])
def test_reference_option_errors_are_one_line(tmp_path, extra, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "t.txt").write_text("x")
    extra = [str(tmp_path / "m") if e == "REF" else e for e in extra]
    r = run_script(tmp_path / "m", "-o", tmp_path / "c.h5", "--text", tmp_path / "t.txt", *extra)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "c.h5").exists()


@needs_capture_deps
def test_layerwise_cli_prints_the_estimate_and_small_models_default_to_whole(tiny_models, tmp_path):
    model, text = tiny_models("mixtral"), tiny_models.root / "text.txt"
    r = run_script(model, "-o", tmp_path / "a.h5", "--text", text, "--tokens", "20", "--seq-len", "8")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert json.loads(f.attrs["source"])["mode"] == "whole-model"
    r = run_script(model, "-o", tmp_path / "b.h5", "--text", text, "--tokens", "20", "--seq-len", "8", "--layerwise")
    assert r.returncode == 0, r.stderr
    assert "estimated peak memory" in r.stderr and "Loading weights" not in r.stderr, r.stderr


@needs_capture_deps
def test_layerwise_damaged_checkpoint_is_one_error_line(tiny_models, tmp_path):
    """A tensor missing from the checkpoint, or a truncated shard: one line naming it, no output."""
    from safetensors.torch import load_file, save_file
    import shutil
    model, text = tiny_models("mixtral"), tiny_models.root / "text.txt"
    shutil.copytree(model, tmp_path / "m")
    w = load_file(str(model / "model.safetensors"))
    del w["model.layers.1.self_attn.q_proj.weight"]
    save_file(w, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    r = run_script(tmp_path / "m", "-o", tmp_path / "c.h5", "--text", text, "--tokens", "20", "--layerwise")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.layers.1.self_attn.q_proj.weight" in last, r.stderr
    assert not (tmp_path / "c.h5").exists() and not list(tmp_path.glob(".c.h5.tmp-*"))

    data = (model / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_script(tmp_path / "m", "-o", tmp_path / "c.h5", "--text", text, "--tokens", "20", "--layerwise")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "model.safetensors" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@needs_capture_deps
def test_memory_benchmark_runs_on_a_tiny_model(tmp_path):
    """tools/bench_capture_memory.py end to end at a tiny size (the real run is d_model 4096, by hand)."""
    r = subprocess.run([sys.executable, str(TOOLS / "bench_capture_memory.py"), "--dir", str(tmp_path), "--d-model", "64",
                        "--d-ff", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
                        "--tokens", "32", "--seq-len", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "peak RSS" in r.stdout and "estimated peak memory" in r.stdout and "cpu: " in r.stdout, r.stdout
    assert list(tmp_path.iterdir()) == []  # the model is deleted


@needs_capture_deps
def test_layerwise_refuses_a_quantized_checkpoint(tiny_models, tmp_path, capsys):
    import shutil
    shutil.copytree(tiny_models("mixtral"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        capture_in_process(tmp_path / "m", tmp_path / "c.h5", tiny_models.root / "text.txt", "--layerwise")
    assert e.value.code == 1
    assert "error: " in capsys.readouterr().err and not (tmp_path / "c.h5").exists()


@needs_capture_deps
def test_sequential_capture_of_an_exported_merged_model(tiny_models, tmp_path):
    """import → merge → export, then --reference the original: layer 0 (unchanged input) equals the
    plain capture, layer 1 has the merged model's inputs and the original's outputs, and
    `smoe-compress stats` accepts the file against the merged checkpoint."""
    exe = REPO / ".build" / "debug" / "smoe-compress"
    if not exe.exists():
        pytest.skip("smoe-compress is not built")
    orig, text = tiny_models("mixtral"), tiny_models.root / "text.txt"
    plain = capture_in_process(orig, tmp_path / "plain.h5", text)
    for args in (["import", orig, "-o", tmp_path / "m.h5"],
                 ["merge", tmp_path / "m.h5", "--calib", plain, "--groups", "2", "-o", tmp_path / "merged.h5"],
                 ["export", tmp_path / "merged.h5", "-o", tmp_path / "exported"],
                 ):
        r = subprocess.run([str(exe), *map(str, args), "--quiet"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    seq = capture_in_process(tmp_path / "exported", tmp_path / "seq.h5", text, "--reference", str(orig))
    a, _, _ = read_capture(plain)
    b, _, src = read_capture(seq)
    assert src["targets"] == "reference"
    first, second = list(a)
    for k in ("hidden_states", "router_logits", "output"):
        assert np.array_equal(a[first][k], b[first][k]), k
    assert not np.array_equal(a[second]["hidden_states"], b[second]["hidden_states"])
    assert np.array_equal(a[second]["output"], b[second]["output"])
    r = subprocess.run([str(exe), "stats", str(tmp_path / "merged.h5"), "--calib", str(seq), "-o", str(tmp_path / "s.h5"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
