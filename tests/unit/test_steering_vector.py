"""SteeringVector: atomic safetensors + JSON round trip, validation on load, and the three constructors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from haltrace.steering.vector import SteeringVector, VectorError


class _Model:
    name_or_path = "other-model"
    hidden_size = 32
    n_layers = 4


def test_round_trip_single_and_per_layer(tmp_path):
    vec = SteeringVector(torch.arange(8.0), layers=[1, 2], hidden_size=8, alpha=2.5, phase="generation",
                         method="mass_mean", model="m", n_layers=4, positions={"from": "instruction_end"},
                         provenance={"task": "entity", "metrics": {"1": {"auroc": 0.9}}})
    path = vec.save(tmp_path / "v")
    assert path.name == "v.safetensors" and (tmp_path / "v.json").is_file()
    assert json.loads((tmp_path / "v.json").read_text())["alpha"] == 2.5
    back = SteeringVector.load(tmp_path / "v.safetensors")
    assert torch.equal(back.direction, vec.direction) and back.positions == vec.positions
    assert back.provenance == vec.provenance and back.phase == "generation"
    per = SteeringVector({0: torch.ones(8), 3: -torch.ones(8)}, layers=[0, 3], hidden_size=8)
    per.save(tmp_path / "p")
    again = SteeringVector.load(tmp_path / "p")
    assert torch.equal(again.for_layer(3), -torch.ones(8))
    with pytest.raises(KeyError, match="not steered"):
        again.for_layer(1)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temp files


def test_wrong_hidden_size_names_both_sizes(tmp_path):
    SteeringVector(torch.ones(16), layers=[0], hidden_size=16, model="small").save(tmp_path / "v")
    with pytest.raises(VectorError, match=r"hidden size 16 .*other-model's hidden size 32"):
        SteeringVector.load(tmp_path / "v", model=_Model())
    SteeringVector(torch.ones(32), layers=[7], hidden_size=32).save(tmp_path / "w")
    with pytest.raises(VectorError, match="out of range"):
        SteeringVector.load(tmp_path / "w", model=_Model())


def test_nan_and_foreign_files_are_rejected(tmp_path):
    good = SteeringVector(torch.ones(4), layers=[0], hidden_size=4)
    meta = json.dumps(good.manifest())
    save_file({"direction": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, str(tmp_path / "nan.safetensors"),
              metadata={"haltrace": meta})
    with pytest.raises(VectorError, match="NaN or inf"):
        SteeringVector.load(tmp_path / "nan")
    save_file({"x": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(VectorError, match="not a haltrace steering vector"):
        SteeringVector.load(tmp_path / "foreign")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(VectorError, match="not a safetensors file"):
        SteeringVector.load(tmp_path / "junk")
    with pytest.raises(VectorError, match="shape"):
        SteeringVector(torch.ones(3), layers=[0], hidden_size=4)


def test_constructors_find_the_planted_direction():
    gen = torch.Generator().manual_seed(0)
    d = 24
    true = torch.zeros(d)
    true[5] = 3.0
    neg = torch.randn(200, d, generator=gen)
    pos = neg + true + 0.3 * torch.randn(200, d, generator=gen)  # paired: same row, shifted
    mm = SteeringVector.from_mass_mean(pos, neg, layers=[1])
    pca = SteeringVector.from_pca_pairs(pos, neg, layers=[1])
    probe = SteeringVector.from_probe(true * 0.01, pos=pos, neg=neg, layers=[1])
    for vec in (mm, pca, probe):
        cos = torch.nn.functional.cosine_similarity(vec.direction, true, dim=0)
        assert cos > 0.95, vec.method
        assert abs(float(vec.direction.norm()) - 3.0) < 0.3  # residual units, not unit norm
    assert (mm.method, pca.method, probe.method) == ("mass_mean", "pca_diff", "probe")


def test_apply_steers_like_the_engine_and_the_quick_start_names_resolve():
    import haltrace
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny, build_tiny_inputs

    hf, tok = build_tiny("llama")
    model, inputs = Model.from_hf(hf, tok, name="tiny-llama"), build_tiny_inputs("llama", tok)
    vec = haltrace.SteeringVector(direction=torch.ones(model.hidden_size), layers=[0, 1],
                                  hidden_size=model.hidden_size, alpha=2.0, n_layers=model.n_layers)
    with torch.no_grad():
        before = model.hf(**inputs).logits
        with vec.apply(model):
            steered = model.hf(**inputs).logits
        with haltrace.steer(model, *[haltrace.Add(f"resid_post.{i}", torch.ones(model.hidden_size), alpha=2.0)
                                     for i in (0, 1)]):
            by_hand = model.hf(**inputs).logits
        assert torch.equal(steered, by_hand) and not torch.allclose(steered, before)
        assert torch.equal(model.hf(**inputs).logits, before)  # removed on exit
        with pytest.raises(VectorError):
            with haltrace.SteeringVector(direction=torch.ones(model.hidden_size), layers=[5],
                                         hidden_size=model.hidden_size).apply(model):
                pass
    for name in ("load", "steer", "Add", "Project", "SteeringVector", "get_method", "list_methods", "save_fitted",
                 "load_fitted", "logit_lens", "attention_to_image", "evaluate", "harvest", "ActivationStore"):
        assert getattr(haltrace, name) is not None, name
