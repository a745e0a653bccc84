"""VTI as the official code (shengliu66/VTI) does it: the textual direction read with the visual edit installed,
every hidden state in the textual PCA, either half optional, the paper preset, strengths chosen on questions
about images the directions never saw, and a saved fit that reloads whole through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import haltrace.steering.vti as vti_mod
from haltrace.data import CaptionPair, YesNoQuestion
from haltrace.errors import InputError
from haltrace.steering.engine import steer
from haltrace.steering.results import load_fitted, save_fitted
from haltrace.steering.vti import (
    VTI,
    RotateTowards,
    VisionRotateTowards,
    caption_states,
    held_out_split,
    image_key,
    mean_plus_pc1,
    textual_direction,
)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(n)]


def _pairs(images) -> list[CaptionPair]:
    return [CaptionPair(im, "a red circle", "a red circle star", prompt="caption :") for im in images]


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits


@pytest.fixture(scope="module")
def llava(tiny_llava):
    images = _images(4)
    return tiny_llava, images, tiny_llava.prepare(["<image> what color is the circle ?"] * 2, images[:2])


def _prompts(model, pairs):
    from haltrace.steering.fitdata import item_prompts

    heads = item_prompts(model, [p.prompt for p in pairs], [p.image for p in pairs])
    return ([f"{h} {p.truthful}" for h, p in zip(heads, pairs, strict=True)],
            [f"{h} {p.hallucinated}" for h, p in zip(heads, pairs, strict=True)])


def test_hidden_states_as_the_official_code_reads_them(llava):
    """Embeddings first, then every block; the last entry after the final norm (HF's hidden_states)."""
    model, images, _ = llava
    good, _ = _prompts(model, _pairs(images[:2]))
    states = caption_states(model, good, images[:2])
    assert states.shape == (2, model.n_layers + 1, model.hidden_size)
    cap = model.capture(model.prepare(good[:1], images[:1]),
                        ["resid_pre.0", f"resid_post.{model.n_layers - 1}"], positions="last")
    assert torch.allclose(states[0, 0], cap["resid_pre.0"][0, -1].float(), atol=1e-5)
    normed = model.adapter.final_norm(cap[f"resid_post.{model.n_layers - 1}"][:, -1]).float()[0]
    assert torch.allclose(states[0, -1], normed, atol=1e-5)


def test_textual_direction_is_read_with_the_visual_edit_installed(llava):
    model, images, _ = llava
    pairs = _pairs(images)
    fitted = VTI().fit(model, pairs, alpha_text=2.0, alpha_image=4.0, num_trials=3)
    text = torch.stack([i.vector for i in fitted.interventions if isinstance(i, RotateTowards)])
    vision = [i for i in fitted.interventions if isinstance(i, VisionRotateTowards)]
    good, bad = _prompts(model, pairs)
    with steer(model, *vision):
        installed = textual_direction(model, good, bad, images)
    plain = textual_direction(model, good, bad, images)
    assert torch.allclose(text, installed, atol=1e-5)
    assert not torch.allclose(text, plain, atol=1e-4)  # the order matters: this is not the unsteered direction
    # the PCA runs over every hidden state (embeddings included), then the embedding entry is dropped
    diff = caption_states(model, good, images) - caption_states(model, bad, images)
    assert torch.allclose(plain, mean_plus_pc1(diff)[1:], atol=1e-5)
    assert fitted.provenance["textual_direction"].startswith("read with the visual edit")


def test_either_half_is_optional(llava, monkeypatch):
    model, images, _ = llava

    def boom(*_a, **_k):
        raise AssertionError("a half with strength 0 must not be computed")

    monkeypatch.setattr(vti_mod, "textual_direction", boom)
    fitted = VTI().fit(model, _pairs(images), alpha_text=0.0, alpha_image=4.0, num_trials=2)
    assert fitted.interventions and all(isinstance(i, VisionRotateTowards) for i in fitted.interventions)
    assert fitted.provenance["textual_direction"].startswith("skipped")
    monkeypatch.undo()
    monkeypatch.setattr(vti_mod, "visual_direction", boom)
    fitted = VTI().fit(model, _pairs(images), alpha_text=2.0, alpha_image=0.0)
    assert all(isinstance(i, RotateTowards) for i in fitted.interventions)


def test_paper_preset(llava):
    model, images, _ = llava
    pairs = _pairs(images)  # no yes/no questions: the preset chooses nothing
    fitted = VTI().fit(model, pairs, preset="paper", num_trials=2)
    prov = fitted.provenance
    assert prov["preset"] == "paper" and prov["alpha_text"] == 0.9 and prov["alpha_image"] == 0.9
    assert prov["selection"] == [] and "preset 'paper'" in prov["selection_rule"]
    text = [i for i in fitted.interventions if isinstance(i, RotateTowards)]
    vision = [i for i in fitted.interventions if isinstance(i, VisionRotateTowards)]
    assert [i.hook for i in text] == [f"mlp_out.{x}" for x in range(model.n_layers)]
    assert all(i.positions == "all" and i.phase == "both" and i.alpha == pytest.approx(0.09) for i in text)
    assert len(vision) == len(model.adapter.vision_blocks) and all(i.alpha == pytest.approx(0.09) for i in vision)
    assert isinstance(prov["deviations"], list) and any("PCA" in d for d in prov["deviations"])
    with pytest.raises(InputError, match="unknown VTI preset 'best'.*'paper'"):
        VTI().fit(model, pairs, preset="best")
    with pytest.raises(InputError, match="alpha_text=-1"):
        VTI().fit(model, pairs, alpha_text=-1.0, alpha_image=0.0)
    mixed = VTI().fit(model, pairs, preset="paper", alpha_image=0.0)
    assert mixed.provenance["alpha_text"] == 0.9 and any("explicit alpha_image" in d
                                                          for d in mixed.provenance["deviations"])


def test_selection_questions_are_on_images_the_directions_never_see(llava):
    model, images, _ = llava
    extra = _images(2, seed=5)
    pairs = _pairs(images)
    shared_q = [YesNoQuestion("is there a circle ?", lab, image=im) for im, lab in zip(images, "yes no yes no".split(),
                                                                                        strict=True)]
    own_q = [YesNoQuestion("is there a star ?", lab, image=im) for im, lab in zip(extra, ["yes", "no"], strict=True)]
    fit_pairs, select, record = held_out_split(pairs, shared_q + own_q, holdout=0.5, seed=0)
    pair_keys = {image_key(p.image) for p in fit_pairs}
    assert not pair_keys & {image_key(q.image) for q in select}
    assert all(q in select for q in own_q)  # questions on images of no pair are always selection questions
    assert record["images_shared_by_pairs_and_questions"] == 4 and record["shared_images_held_out_for_selection"] == 2
    assert len(fit_pairs) == 2 and len(select) == 4
    # the same image as another object (a copy, another array) is the same image
    assert image_key(images[0].copy()) == image_key(images[0])
    fitted = VTI().fit(model, pairs + shared_q + own_q, text_grid=(0.0, 1.0), image_grid=(0.0,), num_trials=2,
                       holdout=0.5)
    split = fitted.provenance["selection_split"]
    assert split["selection_questions"] == 4 and split["direction_pairs"] == 2
    with pytest.raises(ValueError, match="2 caption pairs, got 1 after holding out 1 of the pairs' images"):
        VTI().fit(model, pairs[:2] + shared_q[:2], image_grid=(0.0,), holdout=0.01)


def test_organism_fit_questions_are_not_evaluation_questions():
    """The organism's VTI fit data (directions and selection) share no image with its POPE and CHAIR sets."""
    from haltrace.organism import tasks
    from haltrace.organism.fit_data import fit_items
    from haltrace.organism.world import ShapesWorld

    world = ShapesWorld()
    items = fit_items(world, "vti")
    fit_keys = {image_key(it.image) for it in items}
    pope = tasks.pope_sets(world)
    eval_keys = {image_key(ex.image) for split in pope.values() for ex in split}
    eval_keys |= {image_key(ex.image) for ex in tasks.caption_set(world)}
    assert fit_keys and eval_keys and not fit_keys & eval_keys
    pairs = [it for it in items if isinstance(it, CaptionPair)]
    questions = [it for it in items if isinstance(it, YesNoQuestion)]
    _, select, record = held_out_split(pairs, questions)
    assert record["images_shared_by_pairs_and_questions"] == 0 and len(select) == len(questions)


def test_saved_fit_reloads_whole(llava, tmp_path):
    model, images, inputs = llava
    fitted = VTI().fit(model, _pairs(images), alpha_text=2.0, alpha_image=4.0, num_trials=2)
    assert not fitted.generate_kwargs
    save_fitted(fitted, tmp_path / "vti")
    loaded = load_fitted(tmp_path / "vti")
    assert [type(i).__name__ for i in loaded.interventions] == [type(i).__name__ for i in fitted.interventions]
    with fitted.apply(model):
        expected = _logits(model, inputs)
    with steer(model, loaded):  # steer() takes the loaded fit whole (no custom hooks left to drop)
        assert torch.equal(_logits(model, inputs), expected)
    assert not torch.allclose(_logits(model, inputs), expected)
