"""PvP on a tiny random llava: the paper preset, several layers, and the "most" prompt evaluation (the paper's
headline quantity). The organism's measured numbers are in tests/integration/test_methods_vlm.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haltrace.data import PvPItem
from haltrace.steering.pvp import PvP


@pytest.fixture(scope="module")
def llava(tiny_llava):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(4)]
    return tiny_llava, images, None


def _pvp_items(images, prior="yellow", pixel="blue"):
    return [PvPItem(im, "what color is the circle ?", "what color are most circles ?", prior, pixel, image_id=i)
            for i, im in enumerate(images)]


def test_pvp_paper_preset_with_several_layers(llava):
    from haltrace.errors import InputError

    model, images, inputs = llava
    fitted = PvP().fit(model, _pvp_items(images), preset="paper", layers=[1, 0])
    prov = fitted.provenance
    assert prov["preset"] == "paper" and prov["alpha"] == 1.0 and prov["selection"] == []
    assert prov["layers"]["haltrace"] == ["resid_post.0", "resid_post.1"]
    assert sorted({a.hook for a in fitted.interventions}) == ["resid_post.0", "resid_post.1"]
    assert len(fitted.interventions) == 4 and all(a.alpha == 1.0 for a in fitted.interventions)
    # each layer adds its own mean difference
    v0, v1 = (next(a.vector for a in fitted.interventions if a.hook == h) for h in ("resid_post.0", "resid_post.1"))
    assert not torch.allclose(v0, v1)
    # only the off-by-one remains a deviation when the layers are given at the paper's scale
    assert len(prov["deviations"]) == 1 and "off-by-one" in prov["deviations"][0]
    default = PvP().fit(model, _pvp_items(images), layer=1, alpha=2.0).provenance["deviations"]
    assert any("alpha 2" in d for d in default)
    with pytest.raises(InputError, match="unknown PvP preset"):
        PvP().fit(model, _pvp_items(images), preset="fast")
    with pytest.raises(InputError, match="not both"):
        PvP().fit(model, _pvp_items(images), layer=1, layers=[0])
    with pytest.raises(InputError, match="select_on"):
        PvP().fit(model, _pvp_items(images), select_on="that")
    with pytest.raises(InputError, match="out of range"):
        PvP().fit(model, _pvp_items(images), layers=[0, 7], alpha=1.0)


def test_pvp_paper_preset_chooses_a_layer_on_the_most_prompt(llava):
    model, images, _ = llava
    prov = PvP().fit(model, _pvp_items(images), preset="paper", max_new_tokens=3).provenance
    assert [r["layer"] for r in prov["selection"]] == list(range(model.n_layers))
    assert {r["alpha"] for r in prov["selection"]} == {1.0} and prov["selection_prompt"] == "most"
    assert all({"eligible_flip_rate", "broken_rate", "target_rate"} <= set(r) for r in prov["selection"])
    assert any("layer chosen" in d for d in prov["deviations"])
    assert any("answers of 3 tokens" in d for d in prov["deviations"])
    assert PvP().fit(model, _pvp_items(images), direction="priors", layer=0, alpha=1.0
                     ).provenance["selection_prompt"] == "this"


def test_evaluate_pvp_on_the_most_prompt(llava):
    from haltrace.errors import InputError
    from haltrace.evals.counterfactual import eligible_flips, evaluate_pvp
    from haltrace.steering.pvp import generated_answers

    model, images, _ = llava
    items = _pvp_items(images)
    fitted = PvP().fit(model, items, layer=1, alpha=50.0)  # strong enough to change a random model's answers
    report = evaluate_pvp(model, fitted, items, prompt="most", max_new_tokens=3, keep_answers=True)
    before, after = report["answers_before"], report["answers_after"]
    assert before == generated_answers(model, [it.most_question for it in items], images, max_new_tokens=3)
    assert before != after and report["flip_rate"] > 0
    expected = eligible_flips(before, after, [it.pixel for it in items])
    assert report["eligible_flip_rate"] == expected["eligible_flip_rate"]
    assert report["prompt"] == "most" and report["target"] == "pixel"
    # a random model answers neither colour: every answer is broken
    assert report["broken_rate_before"] == report["before"]["other_rate"] == 1.0
    this = evaluate_pvp(model, fitted, items, prompt="this", max_new_tokens=3, keep_answers=True)
    assert this["answers_before"] != before  # the other prompt was asked
    with pytest.raises(InputError, match="prior and pixel"):
        evaluate_pvp(model, fitted, [PvPItem(images[0], "a ?", "b ?")], max_new_tokens=2)
    with pytest.raises(InputError, match="prompt"):
        evaluate_pvp(model, fitted, items, prompt="that")
