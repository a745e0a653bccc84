"""VHR as the paper does it: heads selected per sample at the prefill, layer by layer, kept for the generation;
the fixed-head mode as an option; fit from user items; presets; save/load through the registry."""

from __future__ import annotations

import pytest
import torch

from haltrace.data import CaptionItem, YesNoQuestion
from haltrace.errors import InputError
from haltrace.organism.fit_data import fit_items
from haltrace.steering.engine import ScaleHeads, steer
from haltrace.steering.fitdata import question_states
from haltrace.steering.registry import get_method
from haltrace.steering.results import load_fitted, save_fitted
from haltrace.steering.vhr import VisionAwareHeads, default_layers, sample_head_scales, select_heads


@pytest.fixture(scope="module")
def organism(random_organism):
    return random_organism


@pytest.fixture(scope="module")
def trained(organism_folder):
    """The organism (trained: 4 layers of 4 heads, where the per-sample head sets differ between prompts)."""
    import haltrace
    from haltrace.organism.paths import organism_world

    model = haltrace.load(organism_folder)
    return model, organism_world(model)


def _items(world, n: int = 3) -> list:
    return [q for q in fit_items(world, "vhr", n_images=n) if isinstance(q, YesNoQuestion)][:n]


def _inputs(model, items):
    from haltrace.steering.fitdata import item_prompts

    prompts = item_prompts(model, [q.question for q in items], [q.image for q in items])
    return model.prepare(prompts, [q.image for q in items])


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits


def _row(inputs, b: int) -> dict:
    return {k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in inputs.items()}


def test_per_sample_selection_is_algorithm_1_row_by_row(organism):
    """Each row's heads equal a plain re-run of the paper's Algorithm 1 on that prompt alone: VHD and TA at the
    last prompt token with and without the image, every earlier layer reinforced with the row's own heads."""
    model, world = organism
    items = _items(world)
    inputs = _inputs(model, items)
    ids = inputs["input_ids"]
    layers, alpha = [0, 1], 2.0
    res = sample_head_scales(model, inputs, model.image_token_mask(ids), torch.full((ids.shape[0],),
                             ids.shape[1] - 1), layers, alpha)
    for b, item in enumerate(items):
        chosen = []
        for layer in layers:
            hook = f"head_out.{layer}"
            with steer(model, *chosen) if chosen else _null():
                _, a = question_states(model, [item], [hook])
                _, t = question_states(model, [item], [hook], drop_image=True)
            vhd, ta = (a[hook][0] - t[hook][0]).norm(dim=-1), (t[hook][0] ** 2).sum(-1)
            assert torch.allclose(res["vhd"][layer][b], vhd, atol=1e-4), (b, layer)
            heads, _ = select_heads(vhd, ta)
            assert res["heads"][layer][b] == heads, (b, layer)
            if heads:
                chosen.append(ScaleHeads(hook, heads=heads, factor=alpha))


def test_rows_get_their_own_heads_and_keep_them_while_generating(trained, monkeypatch):
    import haltrace.steering.vhr as vhr_mod

    model, world = trained
    items = _items(world, 4)
    inputs = _inputs(model, items)
    fitted = get_method("vhr").fit(model, items)
    assert fitted.provenance["heads_mode"] == "sample"
    assert all(isinstance(i, VisionAwareHeads) for i in fitted.interventions)
    assert [i.hook for i in fitted.interventions] == [f"head_out.{x}" for x in default_layers(model.n_layers)]
    with fitted.apply(model):
        batch = _logits(model, inputs)
    per_row = {i.hook: i.last_heads for i in fitted.interventions}
    assert len({tuple(tuple(h) for h in rows) for rows in zip(*per_row.values(), strict=True)}) > 1, \
        "the organism's prompts should differ in at least one layer's heads"
    for b in range(len(items)):  # each row of the batch == that prompt alone under ScaleHeads of its own heads
        fixed = [ScaleHeads(hook, heads=rows[b], factor=2.0) for hook, rows in per_row.items() if rows[b]]
        assert fixed
        with steer(model, *fixed):
            alone = _logits(model, _row(inputs, b))
        assert torch.allclose(batch[b:b + 1], alone, atol=1e-4)
    calls = []
    real = vhr_mod.sample_head_scales
    monkeypatch.setattr(vhr_mod, "sample_head_scales", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fitted.apply(model), torch.no_grad():
        model.hf.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        after = {i.hook: i.last_heads for i in fitted.interventions}
    assert len(calls) == 1  # once per prompt (its prefill), shared by the layers, never per decoding step
    assert after == per_row


def test_text_only_prompt_is_left_alone(organism):
    model, world = organism
    fitted = get_method("vhr").fit(model, _items(world, 2), layers=[0, 1])
    inputs = model.prepare(["is there a fork ?"])
    before = _logits(model, inputs)
    with fitted.apply(model):
        assert torch.equal(_logits(model, inputs), before)


def test_fixed_mode_keeps_one_head_set(organism):
    model, world = organism
    items = fit_items(world, "vhr", n_images=4)
    fitted = get_method("vhr").fit(model, items, heads="fixed", layers=[0, 1])
    assert fitted.interventions and all(isinstance(i, ScaleHeads) and i.factor == 2.0 for i in fitted.interventions)
    assert fitted.provenance["heads_mode"] == "fixed"
    assert any("fixed" in d for d in fitted.provenance["deviations"])
    sample = get_method("vhr").fit(model, items, layers=[0, 1])
    per = sample.provenance["per_sample_selection"]
    assert set(per) == {"head_out.0", "head_out.1"}
    assert all(0.0 <= v["mean_jaccard_with_fixed"] <= 1.0 and v["n"] == len(items) for v in per.values())
    assert sample.provenance["fixed_heads_on_fit_data"] == fitted.provenance["heads"]


def test_presets_and_bad_options(organism):
    model, world = organism
    items = _items(world, 2)
    with pytest.raises(InputError, match="unknown VHR preset 'fast'.*'paper'"):
        get_method("vhr").fit(model, items, preset="fast")
    with pytest.raises(InputError, match="heads='each'.*'sample'.*'fixed'"):
        get_method("vhr").fit(model, items, heads="each")
    paper = get_method("vhr").fit(model, items, preset="paper")
    prov = paper.provenance
    assert prov["preset"] == "paper" and prov["alpha"] == 2.0 and prov["heads_mode"] == "sample"
    assert prov["layers"]["paper_index"] == default_layers(model.n_layers) and prov["outlier_removal"] is True
    assert isinstance(prov["deviations"], list) and all(isinstance(d, str) for d in prov["deviations"])
    override = get_method("vhr").fit(model, items, preset="paper", alpha=3.0)
    assert any("alpha" in d and "override" in d for d in override.provenance["deviations"])


def test_save_load_round_trip(organism, tmp_path):
    model, world = organism
    items = _items(world, 2)
    inputs = _inputs(model, items)
    fitted = get_method("vhr").fit(model, items, alpha=3.0, layers=[0, 1])
    save_fitted(fitted, tmp_path / "vhr")
    loaded = load_fitted(tmp_path / "vhr")
    assert [type(i).__name__ for i in loaded.interventions] == ["VisionAwareHeads"] * 2
    assert loaded.interventions[0].layers == [0, 1] and loaded.interventions[0].alpha == 3.0
    with fitted.apply(model):
        a = _logits(model, inputs)
    with steer(model, loaded):
        assert torch.equal(_logits(model, inputs), a)


def test_fits_from_user_items_on_a_model_without_a_data_source(tiny_llava, tmp_path):
    """A real checkpoint has no default fit data: the fixed mode fits from the user's JSONL items, the per-sample
    mode needs none (and measures its head sets on items when given)."""
    import numpy as np

    from haltrace.data.jsonl import load_items, save_items

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(3)]
    items = ([CaptionItem(im, ["circle"], image_id=i, prompt="describe the image") for i, im in enumerate(images)]
             + [YesNoQuestion("is there a circle ?", "yes", image=im, image_id=i) for i, im in enumerate(images)])
    from PIL import Image

    names = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    path = save_items(tmp_path / "fit.jsonl", [type(it)(**{**it.__dict__, "image": str(tmp_path / n)})
                                               for it, n in zip(items, names * 2, strict=True)])
    loaded = load_items(path)
    layers = [0, 1]
    fixed = get_method("vhr").fit(tiny_llava, loaded, heads="fixed", layers=layers)
    assert fixed.interventions and fixed.provenance["data"]["n_prompts"] == 6
    with pytest.raises(ValueError, match="needs fit data"):
        get_method("vhr").fit(tiny_llava, heads="fixed", layers=layers)
    free = get_method("vhr").fit(tiny_llava, layers=layers)  # per sample: no data needed
    assert free.provenance["data"]["n_prompts"] == 0 and free.provenance["per_sample_selection"] is None
    inputs = tiny_llava.prepare(["<image> describe the image"] * 2, images[:2])
    before = _logits(tiny_llava, inputs)
    with free.apply(tiny_llava):
        assert not torch.allclose(_logits(tiny_llava, inputs), before)


def _null():
    from contextlib import nullcontext

    return nullcontext()
