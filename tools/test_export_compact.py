"""Export of compact checkpoints to transformers (pytest), issue 18.

For both bundled trained fixtures: `smoe-compress merge --groups 4 --router compact`, then
`export`. The folder's expert tensors must be half the original's (always checked, with the
safetensors package or by reading the header). With torch and transformers installed, the folder
is loaded with the stock class (MixtralForCausalLM / SwitchTransformersForConditionalGeneration),
must have 4 experts in every MoE block, and on a few tokens the output of every MoE block must
equal the tool's own forward of the compact checkpoint on the same block inputs: the block inputs
and outputs transformers computed are written as a capture (docs/FORMAT.md section 2) and
`smoe-compress eval COMPACT COMPACT --calib CAPTURE` reports the tool's output against the
captured one. Without torch/transformers those tests skip, saying which is missing; without a
built smoe-compress everything skips.
"""

import json
import pathlib
import struct
import subprocess

import pytest


from optional_deps import h5py, np, torch, transformers  # noqa: F401
from optional_deps import needs_all as needs_transformers

REPO = pathlib.Path(__file__).resolve().parent.parent
EXE = REPO / ".build" / "debug" / "smoe-compress"
CASES = [("trained-mixtral", "MixtralForCausalLM"), ("trained-switch", "SwitchTransformersForConditionalGeneration")]
# How each compact checkpoint is made: a merge with the fitted compact router, and REAP pruning
# (kept router rows, refitted experts): both must export as a stock model with 4 experts.
VARIANTS = {"merge": ("--router", "compact"), "prune": ("--prune", "reap")}


def run(*args):
    r = subprocess.run([str(EXE), *map(str, args), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(fixture, variant): (compact checkpoint, compact folder, original folder)}."""
    if not EXE.exists():
        pytest.skip("smoe-compress is not built (swift build)")
    out = {}
    for name, _ in CASES:
        d = tmp_path_factory.mktemp(name)
        fx = REPO / "Fixtures"
        run("export", fx / f"{name}.h5", "-o", d / "original")
        for variant, flags in VARIANTS.items():
            run("merge", fx / f"{name}.h5", "--calib", fx / f"{name}.calib.h5", "--groups", 4, *flags, "-o", d / f"{variant}.h5")
            run("export", d / f"{variant}.h5", "-o", d / variant)
            out[name, variant] = (d / f"{variant}.h5", d / variant, d / "original")
    return out


def header(folder):
    with open(folder / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def expert_bytes(folder):
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header(folder).items() if ".experts." in k)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_compact_export_halves_the_expert_tensors(exported, name, variant):
    _, compact, original = exported[name, variant]
    assert 2 * expert_bytes(compact) == expert_bytes(original)
    config = json.loads((compact / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 4
    routers = [v["shape"] for k, v in header(compact).items() if k.endswith("gate.weight") or k.endswith("router.classifier.weight")]
    assert routers and all(s[0] == 4 for s in routers)


@needs_transformers
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,cls", CASES)
def test_transformers_loads_compact_folder_and_matches_the_tool(exported, tmp_path, name, cls, variant):
    checkpoint, compact, _ = exported[name, variant]
    model = getattr(transformers, cls).from_pretrained(str(compact), dtype=torch.float32).eval()
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "SparseMLP"))]
    layers = []
    with h5py.File(checkpoint, "r") as f:
        layers = sorted(f["moe_layers"], key=lambda n: int(f["moe_layers"][n].attrs["index"]))
    assert len(blocks) == len(layers) == 4
    for _, m in blocks:
        experts = m.experts
        count = len(experts) if hasattr(experts, "__len__") else getattr(experts, "num_experts", None)
        if count is None:  # fused experts (transformers 5): [E, ...] parameters
            count = next(p for p in experts.parameters()).shape[0]
        assert count == 4
    seen = {}

    def hook(name):
        def h(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            y = output[0] if isinstance(output, tuple) else output
            seen[name] = (x.detach().numpy().copy(), y.reshape(-1, y.shape[-1]).detach().numpy().copy())
        return h

    for n, m in blocks:
        m.register_forward_hook(hook(n))
    ids = torch.tensor([list(b"Compact models load with the stock class.")])
    with torch.no_grad():
        if "Switch" in cls:
            model(input_ids=ids, decoder_input_ids=ids)
        else:
            model(input_ids=ids)
    # Encoder blocks run before decoder blocks, in the order of the checkpoint's layer index.
    capture = tmp_path / "capture.h5"
    with h5py.File(capture, "w") as f:
        f.attrs["format"] = "smoe-calibration"
        f.attrs["format_version"] = 1
        f.attrs["source"] = f"transformers {cls} forward of the exported compact folder"
        for i, ((n, _), layer) in enumerate(zip(blocks, layers)):
            x, y = seen[n]
            g = f.create_group(f"moe_layers/{layer}")
            g.attrs["index"] = i
            g["hidden_states"] = x.astype("float32")
            g["output"] = y.astype("float32")
    report = json.loads(run("eval", checkpoint, checkpoint, "--calib", capture, "--json"))
    for layer in report["evaluation"]["layers"]:
        assert layer["captured_output_error"] < 1e-5, layer
