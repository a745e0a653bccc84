"""Bugs a faithful reproduction trips over: a fit's hooks dropped by ``steer(model, fitted)``, a VTI rotation
exported as a plain add, and control vectors from other tools whose ``layer_count`` is not the model's."""

from __future__ import annotations

import pytest
import torch

from haltrace.models import Model
from haltrace.models.tiny import build_tiny, build_tiny_inputs
from haltrace.steering import Add, steer
from haltrace.steering.registry import FittedIntervention


@pytest.fixture(scope="module")
def tiny_llama():
    hf, tok = build_tiny("llama")
    return Model.from_hf(hf, tok, name="tiny-llama"), build_tiny_inputs("llama", tok)


def _logits(model, inputs):
    with torch.no_grad():
        return model.hf(**inputs).logits


def test_steer_installs_a_fit_whole(tiny_llama):
    """A gated edit plus a plain one (TruthPrInt's and CAA's shapes): steer(model, fitted) runs both, as apply."""
    from haltrace.steering.engine import Gated, LinearDetector

    model, inputs = tiny_llama
    d = model.hidden_size
    det = LinearDetector([0], torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, threshold=0.0)  # always fires
    fitted = FittedIntervention("test", [Add("resid_post.1", torch.ones(d), alpha=3.0),
                                         Gated(Add("resid_post.0", torch.ones(d), positions="producing"), det)])
    before = _logits(model, inputs)
    with steer(model, fitted):
        steered = _logits(model, inputs)
    assert det.stats["fired"] == det.stats["steps"] > 0 and not torch.allclose(steered, before)  # both ran
    with fitted.apply(model):
        assert torch.equal(_logits(model, inputs), steered)
    assert torch.equal(_logits(model, inputs), before)


def test_steer_refuses_a_fit_it_cannot_install_whole(tiny_llama):
    model, _ = tiny_llama
    dola_like = FittedIntervention("dola", [], generate_kwargs={"custom_generate": "dola"})
    with pytest.raises(ValueError, match="generate.*fitted.apply"):
        with steer(model, dola_like):
            pass
    from haltrace.steering.engine import attach

    with pytest.raises(ValueError, match="generate"):
        attach(model, FittedIntervention("x", [Add("resid_post.0", torch.ones(model.hidden_size))],
                                         generate_kwargs={"num_beams": 2}))


def test_rotate_towards_at_resid_post_is_refused_by_export():
    from haltrace.export.convert import intervention_refusals
    from haltrace.steering.vti import RotateTowards

    reasons = intervention_refusals(RotateTowards("resid_post.1", torch.ones(8), alpha=0.5))
    assert reasons and "RotateTowards" in reasons[0] and "not a plain Add" in reasons[0]
    assert intervention_refusals(Add("resid_post.1", torch.ones(8))) == []


@pytest.mark.parametrize("style", ["repeng", "cvector-generator"])
def test_control_vectors_from_other_tools_import_and_apply(tiny_llama, tmp_path, style):
    gguf = pytest.importorskip("gguf")
    from haltrace.export.gguf import read_gguf

    model, inputs = tiny_llama  # 2 layers; llama.cpp's direction.N is added after block N: resid_post.N
    path = tmp_path / f"{style}.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    directions = {1: torch.randn(model.hidden_size)}
    # repeng writes the number of directions; llama.cpp's generator n_layer - 1: neither is the model's count
    writer.add_uint32("controlvector.layer_count", len(directions) if style == "repeng" else 1)
    for n, vec in directions.items():
        writer.add_tensor(f"direction.{n}", vec.numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = read_gguf(path).to_steering_vector()
    assert vec.layers == [1]
    manual = Add("resid_post.1", directions[1], alpha=1.0)
    with steer(model, manual):
        expected = _logits(model, inputs)
    with steer(model, Add("resid_post.1", vec.for_layer(1), alpha=vec.alpha)):
        assert torch.allclose(_logits(model, inputs), expected)
