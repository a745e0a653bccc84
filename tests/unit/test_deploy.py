"""``haltrace.deploy``: a plain-HF, hooks-only applier of exported vectors that matches haltrace's engine."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from haltrace import deploy
from haltrace.deploy import DeployError, apply, find_layers, load_vector, steered
from haltrace.steering import Add, steer
from haltrace.steering.vector import SteeringVector

ATOL = 1e-5
DEPLOY_FILE = Path(deploy.__file__)


# ----------------------------------------------------------------------------------------------- helpers
def _vector(model, layers, *, per_layer=False, hook="resid_post", alpha=3.0, seed=0, **kw) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    d = model.hidden_size
    direction = ({L: torch.randn(d, generator=gen) for L in layers} if per_layer
                 else torch.randn(d, generator=gen))
    return SteeringVector(direction=direction, layers=layers, hidden_size=d, hook=hook, alpha=alpha,
                          model=model.name_or_path, n_layers=model.n_layers, **kw)


def _engine(model, vec: SteeringVector):
    return steer(model, *[Add(f"{vec.hook}.{L}", vec.for_layer(L), alpha=vec.alpha) for L in vec.layers])


def _logits(hf, inputs) -> torch.Tensor:
    with torch.no_grad():
        return hf(**inputs).logits


def _generate(hf, inputs, pad: int):
    with torch.no_grad():
        return hf.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=pad, output_logits=True,
                           return_dict_in_generate=True)


def _hooks(hf) -> dict:
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in hf.named_modules()}


def _write_raw(path: Path, tensors: dict, manifest: dict) -> Path:
    """A vector file written by hand, to build the corrupt or foreign files SteeringVector refuses to save."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"haltrace": json.dumps(manifest)})
    return path


@pytest.fixture(scope="module")
def organism():
    """The shipped organism (a tiny LLaVA) and a 2-row image+prompt batch of its POPE questions."""
    from PIL import Image

    import haltrace
    from haltrace.organism import tasks
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.world import ShapesWorld, WorldConfig

    model = haltrace.load("shapes-llava", device="cpu")
    world = ShapesWorld(WorldConfig.from_dict(json.loads((resolve_organism("shapes-llava") / "world.json")
                                                         .read_text())))
    examples = tasks.pope_sets(world, n_images=2)["adversarial"][:2]
    inputs = model.prepare([ex.full_prompt for ex in examples], images=[Image.fromarray(ex.image) for ex in examples])
    return model, inputs


@pytest.fixture(params=["organism", "llama", "gpt2"])
def case(request, tiny_model, tiny_inputs):
    if request.param == "organism":
        return request.getfixturevalue("organism")
    return tiny_model(request.param), tiny_inputs(request.param)


# ------------------------------------------------------------------------------- agreement with the engine
@pytest.mark.parametrize("hook,per_layer", [("resid_post", False), ("resid_post", True), ("resid_pre", True)])
def test_deploy_matches_engine_logits(case, hook, per_layer, tmp_path):
    model, inputs = case
    layers = [0, model.n_layers - 1] if per_layer else [model.n_layers // 2]
    vec = _vector(model, layers, per_layer=per_layer, hook=hook)
    path = vec.save(tmp_path / "vec")
    pristine = _logits(model.hf, inputs)
    with _engine(model, vec):
        engine = _logits(model.hf, inputs)
    with steered(model.hf, path):
        deployed = _logits(model.hf, inputs)
    diff = (engine - deployed).abs().max().item()
    print(f"{model.name_or_path} {hook} layers={layers}: max |engine - deploy| = {diff:.3g}")
    assert diff <= ATOL
    assert (deployed - pristine).abs().max().item() > 1e-2  # the vector did something, so the test can fail
    assert torch.equal(_logits(model.hf, inputs), pristine)


def test_deploy_matches_engine_generate(case, tmp_path):
    model, inputs = case
    vec = _vector(model, list(range(min(3, model.n_layers))), per_layer=True)
    path = vec.save(tmp_path / "vec")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    with _engine(model, vec):
        engine = _generate(model.hf, inputs, pad)
    with steered(model.hf, path):
        deployed = _generate(model.hf, inputs, pad)
    assert torch.equal(engine.sequences, deployed.sequences)
    for a, b in zip(engine.logits, deployed.logits, strict=True):  # every decoding step, under the KV cache
        assert torch.allclose(a, b, atol=ATOL)


def test_bfloat16_model_matches_engine(tiny_llama, tiny_inputs, tmp_path):
    from haltrace.models import Model

    model = Model.from_hf(copy.deepcopy(tiny_llama.hf).to(torch.bfloat16), tiny_llama.tokenizer, name="bf16")
    inputs = tiny_inputs("llama")
    vec = _vector(model, [1])
    with _engine(model, vec):
        engine = _logits(model.hf, inputs)
    with steered(model.hf, vec.save(tmp_path / "vec")):
        deployed = _logits(model.hf, inputs)
    assert deployed.dtype == torch.bfloat16
    assert torch.allclose(engine.float(), deployed.float(), atol=ATOL)


# ------------------------------------------------------------------------------------------------- API
def test_hooks_removed_when_block_raises(tiny_llama, tiny_inputs, tmp_path):
    model, inputs = tiny_llama, tiny_inputs("llama")
    path = _vector(model, [0, 1]).save(tmp_path / "vec")
    before, pristine = _hooks(model.hf), _logits(model.hf, inputs)
    with pytest.raises(RuntimeError, match="boom"), steered(model.hf, path) as handle:
        assert handle.active
        raise RuntimeError("boom")
    assert not handle.active
    assert _hooks(model.hf) == before
    assert torch.equal(_logits(model.hf, inputs), pristine)


def test_apply_handle_alpha_override_and_explicit_layers(tiny_llama, tiny_inputs, tmp_path):
    model, inputs = tiny_llama, tiny_inputs("llama")
    vec = _vector(model, [1], alpha=3.0)
    path = vec.save(tmp_path / "vec")
    pristine = _logits(model.hf, inputs)
    handle = apply(model.hf, load_vector(path), layers=model.hf.model.layers)
    try:
        explicit = _logits(model.hf, inputs)
    finally:
        handle.remove()
    handle.remove()  # idempotent
    with steered(model.hf, str(path).replace(".safetensors", ".json")):  # NAME.json names the same vector
        found = _logits(model.hf, inputs)
    assert torch.equal(explicit, found)
    with apply(model.hf, tmp_path / "vec", alpha=0.0):
        assert torch.equal(_logits(model.hf, inputs), pristine)
    with apply(model.hf, path, alpha=6.0):
        doubled = _logits(model.hf, inputs)
    with _engine(model, _vector(model, [1], alpha=6.0)):
        assert torch.allclose(_logits(model.hf, inputs), doubled, atol=ATOL)
    assert torch.equal(_logits(model.hf, inputs), pristine)


def test_load_vector_reads_manifest(tiny_llama, tmp_path):
    vec = _vector(tiny_llama, [0, 1], per_layer=True, alpha=2.5)
    loaded = load_vector(vec.save(tmp_path / "vec"))
    assert loaded.layers == [0, 1] and loaded.alpha == 2.5 and loaded.hidden_size == tiny_llama.hidden_size
    assert torch.equal(loaded.directions[1], vec.for_layer(1))


def test_find_layers_on_common_models(tiny_llama, tiny_gpt2, organism):
    assert find_layers(tiny_llama.hf) is tiny_llama.adapter.layers
    assert find_layers(tiny_gpt2.hf) is tiny_gpt2.adapter.layers
    assert find_layers(organism[0].hf) is organism[0].adapter.layers


def test_format_version_2_with_extra_keys_is_accepted(tiny_llama, tmp_path):
    vec = _vector(tiny_llama, [1])
    manifest = {**vec.manifest(), "format_version": 2, "model_revision": "abc", "layer_convention": "x",
                "haltrace_version": "9", "data_fingerprint": "sha256:0"}
    loaded = load_vector(_write_raw(tmp_path / "v2.safetensors", {"direction": vec.direction}, manifest))
    assert loaded.layers == [1] and loaded.manifest["model_revision"] == "abc"


# ---------------------------------------------------------------------------------------- clear refusals
@pytest.mark.parametrize("change,message", [
    ({"positions": "last"}, "positions 'last'.*positions='all'"),
    ({"phase": "prompt"}, "phase 'prompt'.*phase='both'"),
    ({"hook": "attn_out"}, "'attn_out'.*resid_post"),
    ({"format_version": 3}, "format version 3"),
    ({"format": "other"}, "not a haltrace steering vector"),
])
def test_unsupported_manifests_are_refused(tiny_llama, tmp_path, change, message):
    vec = _vector(tiny_llama, [1])
    path = _write_raw(tmp_path / "v.safetensors", {"direction": vec.direction}, {**vec.manifest(), **change})
    with pytest.raises(DeployError, match=message):
        load_vector(path)


def test_nan_and_inf_are_refused(tiny_llama, tmp_path):
    vec = _vector(tiny_llama, [1])
    bad = vec.direction.clone()
    bad[3] = float("nan")
    with pytest.raises(DeployError, match="NaN or inf"):
        load_vector(_write_raw(tmp_path / "nan.safetensors", {"direction": bad}, vec.manifest()))
    with pytest.raises(DeployError, match="alpha is inf"):
        apply(tiny_llama.hf, vec.save(tmp_path / "ok"), alpha=float("inf"))


def test_wrong_model_is_refused_and_nothing_installed(tiny_llama, tmp_path):
    hf = tiny_llama.hf
    before = _hooks(hf)
    small = SteeringVector(direction=torch.ones(16), layers=[1], hidden_size=16, model="other")
    with pytest.raises(DeployError, match=r"hidden size 16 \(made for other\).*hidden size 32"):
        apply(hf, small.save(tmp_path / "small"))
    far = SteeringVector(direction=torch.ones(32), layers=[0, 5], hidden_size=32)  # no n_layers recorded
    with pytest.raises(DeployError, match=r"layers \[5\] are out of range: this model has layers 0\.\.1"):
        apply(hf, far.save(tmp_path / "far"))
    deep = SteeringVector(direction=torch.ones(32), layers=[0], hidden_size=32, n_layers=24, model="big")
    with pytest.raises(DeployError, match="24 layers.*this model has 2"):
        apply(hf, deep.save(tmp_path / "deep"))
    assert _hooks(hf) == before


def test_unreadable_files_are_refused(tiny_llama, tmp_path):
    path = _vector(tiny_llama, [1]).save(tmp_path / "vec")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeployError, match="not a readable safetensors file"):
        load_vector(tmp_path / "cut.safetensors")
    # the bytes of a pickle (protocol 4, an empty dict), written by hand: refused, never unpickled
    (tmp_path / "pickled.safetensors").write_bytes(b"\x80\x04}\x94.")
    with pytest.raises(DeployError, match="not a readable safetensors file"):
        load_vector(tmp_path / "pickled")
    with pytest.raises(DeployError, match="not found"):
        load_vector(tmp_path / "missing")


def test_unknown_architecture_asks_for_layers(tmp_path):
    with pytest.raises(DeployError, match=r"tried model\.language_model\.layers, model\.layers.*layers="):
        find_layers(torch.nn.Linear(4, 4))
    vec = SteeringVector(direction=torch.ones(4), layers=[0], hidden_size=4)
    with pytest.raises(DeployError, match="ModuleList"):
        apply(torch.nn.Linear(4, 4), vec.save(tmp_path / "v"), layers=torch.nn.Linear(4, 4))
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with apply(torch.nn.Linear(4, 4), tmp_path / "v", layers=blocks):  # explicit layers= work on anything
        assert torch.allclose(blocks[0](torch.zeros(4)) - blocks[0].bias, torch.ones(4))


# ------------------------------------------------------------------------------------ a single, clean file
def test_deploy_imports_no_other_haltrace_module_and_runs_as_a_copied_file(tmp_path, tiny_llama):
    source = DEPLOY_FILE.read_text()
    assert "haltrace." not in "".join(line for line in source.splitlines() if line.lstrip().startswith(
        ("import ", "from ")))
    (tmp_path / "hf_steer.py").write_text(source)
    path = _vector(tiny_llama, [1]).save(tmp_path / "vec")
    script = f"""
import importlib, sys
sys.modules["haltrace"] = None  # any import of haltrace from the copy would fail
sys.path.insert(0, {str(tmp_path)!r})
steer_copy = importlib.import_module("hf_steer")
assert steer_copy.load_vector({str(path)!r}).layers == [1]
del sys.modules["haltrace"]
sys.path.pop(0)
import haltrace
before = set(sys.modules)
import haltrace.deploy
new = sorted(m for m in set(sys.modules) - before if m == "haltrace" or m.startswith("haltrace."))
assert new == ["haltrace.deploy"], new
allowed = {{"torch", "transformers", "safetensors", *sys.stdlib_module_names}}
import ast
for node in ast.walk(ast.parse(open(haltrace.deploy.__file__).read())):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            assert name.split(".")[0] in allowed or name == "__future__", name
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
