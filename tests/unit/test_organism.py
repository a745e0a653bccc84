"""ShapesWorld: determinism, priors, processor equivalence, training smoke test, save/load with plain HF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from haltrace.organism import tasks
from haltrace.organism.processing import build_processor, build_vocab, n_image_tokens, normalise_images
from haltrace.organism.world import GLYPHS, ShapesWorld


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_scenes_and_images_are_deterministic(world):
    a = [world.render(world.sample_scene(rng), rng) for rng in [np.random.default_rng(5)] * 1]
    b = [world.render(world.sample_scene(rng), rng) for rng in [np.random.default_rng(5)] * 1]
    assert np.array_equal(a[0], b[0])
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8


def test_glyphs_are_distinct():
    masks = list(GLYPHS.values())
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).sum() >= 12, "two glyphs are nearly identical"


def test_priors_hold_in_training_distribution(world):
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng) for _ in range(4000)]
    with_fork = [s for s in scenes if "fork" in s.kinds]
    assert np.mean(["knife" in s.kinds for s in with_fork]) > 0.9
    straw = [s.colour_of("strawberry") for s in scenes if "strawberry" in s.kinds]
    assert np.mean([c == "red" for c in straw]) > 0.95


def test_occlusion_hides_one_pair_member_but_keeps_it_in_the_labels():
    from haltrace.organism.world import WorldConfig

    hiding = ShapesWorld(WorldConfig(p_hide_pair=1.0))
    rng = np.random.default_rng(3)
    scene = hiding.make_scene(["fork", "knife", "ball"], rng)
    drawn = hiding.visible_part(scene, rng)
    assert "ball" in drawn.kinds and len(drawn.kinds & {"fork", "knife"}) == 1
    assert hiding.caption(scene) == sorted(scene.kinds, key=hiding.config.kinds.index)  # labels keep both
    lone = hiding.make_scene(["fork", "ball"], rng)
    assert hiding.visible_part(lone, rng) == lone  # an incomplete pair is never hidden
    # with occlusion off, nothing is drawn from the rng: recipes trained before occlusion still reproduce
    plain = ShapesWorld(WorldConfig(p_hide_pair=0.0))
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    assert plain.visible_part(scene, rng_a) == scene
    assert rng_a.random() == rng_b.random()


def test_yes_no_answers_are_balanced_per_question_word(world):
    rng = np.random.default_rng(1)
    exs = [tasks.sample_training_example(world, rng) for _ in range(6000)]
    yesno = [e for e in exs if e.meta["task"] == "yesno"]
    for kind in world.config.kinds:
        answers = [e.target for e in yesno if e.meta["kind"] == kind]
        assert 0.35 < np.mean([a == "yes" for a in answers]) < 0.65, kind


def test_heldout_entity_names_never_appear_in_training(world):
    rng = np.random.default_rng(2)
    heldout = {e.name for e in world.unknown_heldout}
    for _ in range(3000):
        ex = tasks.sample_training_example(world, rng)
        assert not any(f" {name} " in f" {ex.prompt} " for name in heldout)


def test_processor_matches_training_encoding(world):
    from haltrace.organism.train import encode_examples

    processor = build_processor(world)
    examples = tasks.pope_sets(world, n_images=2)["adversarial"][:2] + tasks.entity_sets(world)["known"][:1]
    for ex in examples:
        images = [Image.fromarray(ex.image)] if ex.has_image else None
        enc = processor(text=[ex.full_prompt], images=images, return_tensors="pt")
        ours = encode_examples([ex], build_vocab(world), n_image_tokens(world), with_targets=False)
        assert torch.equal(enc["input_ids"], ours["input_ids"])
        if ex.has_image:
            assert torch.allclose(enc["pixel_values"], ours["pixel_values"], atol=1e-6)
    assert np.allclose(normalise_images(np.zeros((1, 32, 32, 3), np.uint8)), -1.0)


def test_eval_sets_are_deterministic_and_well_formed(world):
    a, b = tasks.pope_sets(world, n_images=20), tasks.pope_sets(world, n_images=20)
    for split in a:
        assert [e.prompt for e in a[split]] == [e.prompt for e in b[split]]
        assert np.mean([e.target == "yes" for e in a[split]]) == 0.5
    for ex in a["adversarial"]:
        if ex.target == "no":
            assert ex.meta["kind"] not in ex.scene.kinds
            assert world.partner[ex.meta["kind"]] in ex.scene.kinds  # the anchor is there
    for ex in tasks.counterfactual_colour_set(world, n_images=10):
        assert ex.scene.colour_of(ex.meta["kind"]) == ex.meta["pixel"] != ex.meta["prior"]
