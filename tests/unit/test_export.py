"""Export: llama.cpp GGUF control vectors read back with gguf.GGUFReader (names, dtype, shapes, values, layer
mapping), refusals that say why, conversion of `haltrace steer --out` folders, and the `haltrace export` CLI."""

from __future__ import annotations

import json
import os
import sys

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from haltrace.cli import app
from haltrace.export import ExportError, export, export_gguf, load_vector, read_gguf, vector_from_fitted
from haltrace.steering.engine import Add, Gated, LinearDetector, NormPreservingAdd, Project, ScaleHeads, steer
from haltrace.steering.registry import FittedIntervention
from haltrace.steering.results import save_fitted
from haltrace.steering.vector import SteeringVector

runner = CliRunner()
D = 16


def _vec(**kw) -> SteeringVector:
    gen = torch.Generator().manual_seed(0)
    base = dict(direction={1: torch.randn(D, generator=gen), 3: torch.randn(D, generator=gen)}, layers=[1, 3],
                hidden_size=D, alpha=-2.5, model="org/model", n_layers=6, method="mass_mean")
    return SteeringVector(**(base | kw))


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: (f.contents(), f.types[0]) for name, f in reader.fields.items()}


def test_gguf_round_trip_read_with_gguf_reader(tmp_path):
    vec = _vec()
    result = export_gguf(vec, tmp_path / "cv.gguf", model_hint="llama")
    path = tmp_path / "cv.gguf"
    fields = _fields(path)
    assert fields["general.architecture"][0] == "controlvector"
    assert fields["controlvector.model_hint"][0] == "llama"
    assert fields["controlvector.layer_count"] == (6, gguf.GGUFValueType.UINT32)  # the model's layer count
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]  # resid_post.L -> direction.L, nothing else
    for layer in (1, 3):
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.dtype == np.float32
        assert list(t.shape) == [D] and t.data.ndim == 1
        np.testing.assert_allclose(t.data, (vec.for_layer(layer) * vec.alpha).numpy(), rtol=1e-6)
    assert result.layers == {"resid_post.1": "direction.1", "resid_post.3": "direction.3"}
    assert json.loads(fields["haltrace.manifest"][0])["alpha"] == -2.5
    assert (os.stat(path).st_mode & 0o777) == 0o644 and sorted(os.listdir(tmp_path)) == ["cv.gguf"]
    back = read_gguf(path)  # our reader maps direction.N back through conventions
    assert back.tensor_names == {1: "direction.1", 3: "direction.3"} and back.layer_count == 6
    again = back.to_steering_vector()
    assert again.hook == "resid_post" and again.alpha == 1.0 and again.method == "mass_mean"
    assert torch.allclose(again.for_layer(3), vec.for_layer(3) * vec.alpha)


def test_shared_direction_and_resid_pre_map_through_conventions(tmp_path):
    shared = SteeringVector(torch.ones(D), layers=[2, 4], hidden_size=D, alpha=3.0)
    result = export_gguf(shared, tmp_path / "a.gguf")
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors]
    assert names == ["direction.2", "direction.4"]
    assert "layer count is unknown" in result.notes[0] and result.n_layers == 5  # highest index + 1
    pre = SteeringVector(torch.ones(D), layers=[3], hidden_size=D, hook="resid_pre", n_layers=6)
    assert export_gguf(pre, tmp_path / "p.gguf").layers == {"resid_pre.3": "direction.2"}  # = resid_post.2
    assert [t.name for t in gguf.GGUFReader(str(tmp_path / "p.gguf")).tensors] == ["direction.2"]


@pytest.mark.parametrize("kw, words", [
    ({"layers": [0], "direction": torch.ones(D)}, r"resid_post\.0 has no llama\.cpp .*rejects direction\.0"),
    ({"hook": "resid_pre", "layers": [1], "direction": torch.ones(D)}, r"resid_pre\.1 \(= resid_post\.0\)"),
    ({"hook": "resid_pre", "layers": [0], "direction": torch.ones(D)}, "embedding output"),
    ({"positions": "last"}, "every token position .*no position masks"),
    ({"phase": "prompt"}, "only in the prompt phase; llama.cpp adds a control vector while reading the prompt and"),
    ({"hook": "attn_out"}, "only to the residual stream"),
    ({"hook": "mlp_out"}, "only to the residual stream"),
])
def test_vectors_gguf_cannot_express_are_refused(tmp_path, kw, words):
    with pytest.raises(ExportError, match=words):
        export_gguf(_vec(**kw), tmp_path / "x.gguf")
    assert not os.listdir(tmp_path)  # nothing written, not even a temp file


V = torch.ones(D)


@pytest.mark.parametrize("fitted, words", [
    (FittedIntervention("p", [Project("resid_post.2", V)]), r"Project at resid_post\.2 .*depends on the activation"),
    (FittedIntervention("n", [NormPreservingAdd("resid_post.2", V)]), "NormPreservingAdd .*own norm"),
    (FittedIntervention("s", [ScaleHeads("head_out.1", heads=[0, 2], factor=2.0)]),
     r"ScaleHeads at head_out\.1 .*heads \[0, 2\].*never to heads"),
    (FittedIntervention("h", [Add("head_out.1", torch.ones(4), head=1)]), "no per-head hook"),
    (FittedIntervention("l", [Add("resid_post.2", V, positions="last")]), "positions='last'.*no position masks"),
    (FittedIntervention("ph", [Add("resid_post.2", V, phase="prompt")]), "only in the prompt phase"),
    (FittedIntervention("g", [Gated(Add("resid_post.2", V, positions="producing"),
                                    LinearDetector([2], V, V.abs() + 1, V, 0.0, threshold=0.5))]),
     "Gated at resid_post.2 is not a plain Add"),
    (FittedIntervention("d", [], generate_kwargs={"dola_layers": "high"}), "decoding strategy"),
    (FittedIntervention("e", []), "nothing to export"),
])
def test_fitted_interventions_gguf_cannot_express_are_refused(tmp_path, fitted, words):
    with pytest.raises(ExportError, match=words):
        export_gguf(fitted, tmp_path / "x.gguf")
    assert not os.listdir(tmp_path)


def test_fitted_adds_become_one_vector():
    a, b = torch.arange(float(D)), torch.ones(D)
    same = vector_from_fitted(FittedIntervention("m", [Add("resid_post.1", a, alpha=2.0),
                                                       Add("resid_post.3", b, alpha=2.0)]))
    assert same.alpha == 2.0 and same.layers == [1, 3] and torch.equal(same.for_layer(1), a)  # alpha kept
    mixed = vector_from_fitted(FittedIntervention("m", [Add("resid_post.1", a, alpha=2.0),
                                                        Add("resid_pre.2", b, alpha=-1.0),  # = resid_post.1
                                                        Add("resid_post.3", b, alpha=0.5)]))
    assert mixed.alpha == 1.0 and mixed.hook == "resid_post" and mixed.layers == [1, 3]  # alphas folded
    assert torch.allclose(mixed.for_layer(1), 2 * a - b) and torch.allclose(mixed.for_layer(3), 0.5 * b)


def test_steer_out_folder_exports_with_model_facts(tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(hidden_size=D, num_hidden_layers=5, num_attention_heads=2, intermediate_size=32,
                vocab_size=32).save_pretrained(model_dir)
    fitted = FittedIntervention("caa-like", [Add("resid_post.2", V, alpha=4.0)],
                                {"data": {"fingerprint": "f00d"}, "direction": V})
    save_fitted(fitted, tmp_path / "run", extra={"model": str(model_dir)})
    vec = load_vector(tmp_path / "run")
    assert (vec.n_layers, vec.hidden_size, vec.model, vec.data_fingerprint) == (5, D, str(model_dir), "f00d")
    result = export(tmp_path / "run", tmp_path / "run.gguf")
    assert result.n_layers == 5 and _fields(tmp_path / "run.gguf")["controlvector.layer_count"][0] == 5
    np.testing.assert_allclose(read_gguf(tmp_path / "run.gguf").directions[2].numpy(), 4.0 * V.numpy())
    gated = FittedIntervention("gated", [Gated(Add("resid_post.2", V, positions="producing"),
                                               LinearDetector([2], V, V.abs() + 1, V, 0.0, threshold=0.5))])
    save_fitted(gated, tmp_path / "gated", extra={"model": str(model_dir)})
    with pytest.raises(ExportError, match="Gated at resid_post.2 is not a plain Add"):
        load_vector(tmp_path / "gated")


def test_llama_cpp_semantics_match_the_engine(tiny_llama, tiny_inputs, tmp_path):
    """Emulate llama.cpp's applier on a tiny Llama: direction.N is added to the output of block N (read with
    GGUFReader only). It must equal haltrace's own Add at resid_post.N."""
    model, inputs = tiny_llama, tiny_inputs("llama")
    last = model.n_layers - 1
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1))
    export_gguf(SteeringVector(v, layers=[last], hidden_size=model.hidden_size, alpha=3.0,
                               n_layers=model.n_layers), tmp_path / "cv.gguf")

    def add(delta):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (output[0] + delta, *output[1:])
            return output + delta
        return hook

    handles = []
    for t in gguf.GGUFReader(str(tmp_path / "cv.gguf")).tensors:
        il = int(t.name.split(".")[1])  # llama.cpp: build_cvec(cur, il) at the end of block il
        handles.append(model.adapter.layers[il].register_forward_hook(add(torch.from_numpy(t.data.copy()))))
    try:
        with torch.no_grad():
            llama_cpp = model.hf(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), steer(model, Add(f"resid_post.{last}", v, alpha=3.0)):
        engine = model.hf(**inputs).logits
    with torch.no_grad():
        plain = model.hf(**inputs).logits
    assert torch.allclose(llama_cpp, engine, atol=1e-5) and not torch.allclose(plain, engine, atol=1e-3)


def test_read_gguf_applies_llama_cpp_checks(tmp_path):
    def write(name, arch, tensors):
        writer = gguf.GGUFWriter(str(tmp_path / name), arch)
        for key, value in tensors.items():
            writer.add_tensor(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    ones = np.ones(D, dtype=np.float32)
    with pytest.raises(ExportError, match="not 'controlvector'"):
        read_gguf(write("llama.gguf", "llama", {"direction.1": ones}))
    with pytest.raises(ExportError, match="start at direction.1"):
        read_gguf(write("zero.gguf", "controlvector", {"direction.0": ones}))
    with pytest.raises(ExportError, match="1-D"):
        read_gguf(write("two.gguf", "controlvector", {"direction.1": np.ones((2, D), dtype=np.float32)}))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        read_gguf(tmp_path / "junk.gguf")


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"haltrace\[gguf\]"):
        export_gguf(_vec(), tmp_path / "x.gguf")


def test_cli_export_table_json_and_errors(tmp_path):
    _vec().save(tmp_path / "vec")
    res = runner.invoke(app, ["export", str(tmp_path / "vec.safetensors"), "--format", "gguf", "--out",
                              str(tmp_path / "vec.gguf"), "--model-hint", "llama"])
    assert res.exit_code == 0, res.output
    assert "resid_post.3 -> direction.3" in res.stdout and "gguf" in res.stdout and "16" in res.stdout
    assert read_gguf(tmp_path / "vec.gguf").model_hint == "llama"
    res = runner.invoke(app, ["export", str(tmp_path / "vec.safetensors"), "--format", "safetensors", "--out",
                              str(tmp_path / "copy"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["format"] == "safetensors" and data["layers"] == {"resid_post.1": "direction.1",
                                                                   "resid_post.3": "direction.3"}
    assert SteeringVector.load(tmp_path / "copy").alpha == -2.5
    _vec(positions="last").save(tmp_path / "masked")
    res = runner.invoke(app, ["export", str(tmp_path / "masked.safetensors"), "--out", str(tmp_path / "m.gguf")])
    flat = " ".join(res.output.replace("│", " ").split())  # typer wraps the message in a box
    assert res.exit_code != 0 and "no position masks" in flat and "Traceback" not in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "vec.safetensors"), "--format", "onnx", "--out", "x"])
    assert res.exit_code != 0 and "onnx" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "missing.safetensors"), "--out", "x.gguf"])
    assert res.exit_code != 0 and "does not exist" in res.output
