"""Every registered method saved with ``save_fitted`` and read back with ``load_fitted`` steers exactly as the fit
that was saved: same logits on the same inputs, bit for bit, and different from the unsteered model's.

Fits use the shipped organism with cheap explicit options where a method would otherwise search a grid (the
round trip, not the strengths, is under test).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# options that skip strength searches; every method not named here fits with its defaults
CHEAP = {"vti": {"alpha_text": 4.0, "alpha_image": 4.0}, "erasure": {"edit_layer": 1, "text_rep": "embed", "weight": 2.0}}


@pytest.fixture(scope="module")
def organism(shipped_organism):
    return shipped_organism


@pytest.fixture(scope="module")
def inputs(organism):
    """Captions and yes/no questions on anchor-without-partner scenes (where the hook-based methods act)."""
    from haltrace.organism import tasks
    from haltrace.organism.paths import organism_world

    world = organism_world(organism)
    rng = np.random.default_rng(777)
    prompts, images = [], []
    for _ in range(4):
        scene, anchor = tasks.fit_anchor_scene(world, rng, max_other=1)
        image = world.render(scene, rng)
        prompts += [tasks.IMAGE_PREFIX + tasks.CAPTION_PROMPT, tasks.IMAGE_PREFIX + tasks.yesno_prompt(
            world.partner[anchor])]
        images += [image, image]
    return organism.prepare(prompts, images)


def _logits(model, inputs, fitted=None):
    with torch.no_grad():
        if fitted is None:
            return model.hf(**inputs).logits
        with fitted.apply(model):
            return model.hf(**inputs).logits


def _methods():
    from haltrace.steering.registry import list_methods

    return list_methods()


@pytest.mark.parametrize("name", _methods())
def test_saved_method_steers_like_the_fit(organism, inputs, name, tmp_path):
    from haltrace.steering.registry import get_method
    from haltrace.steering.results import load_fitted, save_fitted

    fitted = get_method(name).fit(organism, **CHEAP.get(name, {}))
    save_fitted(fitted, tmp_path)
    manifest = json.loads((tmp_path / "intervention.json").read_text())
    assert all("state" in row for row in manifest["interventions"])  # every edit saved as its registered type
    loaded = load_fitted(tmp_path)
    assert loaded.method == name
    assert [type(i).__name__ for i in loaded.interventions] == [type(i).__name__ for i in fitted.interventions]
    assert loaded.generate_kwargs == fitted.generate_kwargs

    base = _logits(organism, inputs)
    original = _logits(organism, inputs, fitted)
    restored = _logits(organism, inputs, loaded)
    assert not torch.equal(original, base), f"{name} changes nothing on these inputs: the round trip proves nothing"
    assert torch.equal(restored, original)
    assert torch.equal(_logits(organism, inputs), base)  # and nothing is left installed
