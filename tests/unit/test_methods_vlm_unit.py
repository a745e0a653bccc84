"""PvP, ProjectAway, VTI and VISTA on a tiny random llava: shapes, hook removal, validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haltrace.data import CaptionItem, CaptionPair, PvPItem
from haltrace.steering.engine import from_state, steer, to_state
from haltrace.steering.erasure import ProjectAway, ProjectAwayEdit, erase, text_representations
from haltrace.steering.fitdata import last_token_states
from haltrace.steering.pvp import PvP
from haltrace.steering.registry import list_methods
from haltrace.steering.vista import VISTA, default_sla_layers, steering_vectors
from haltrace.steering.vti import (
    VTI,
    RotateTowards,
    VisionRotateTowards,
    mask_patches,
    mean_plus_pc1,
    rotate_towards,
)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(n)]


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits


@pytest.fixture(scope="module")
def llava(tiny_llava):
    images = _images(4)
    inputs = tiny_llava.prepare(["<image> what color is the circle ?"] * 2, images[:2])
    return tiny_llava, images, inputs


def test_registered():
    assert {"pvp", "erasure", "vti", "vista"} <= set(list_methods())


def test_rotation_preserves_norm_and_alpha_zero_is_identity():
    x = torch.randn(2, 5, 8)
    d = torch.randn(8)
    assert torch.allclose(rotate_towards(x, d, 0.0), x, atol=1e-6)
    y = rotate_towards(x, d, 0.7, adaptive=True)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    cos = lambda a: torch.nn.functional.cosine_similarity(a, d.expand_as(a), dim=-1)  # noqa: E731
    assert bool((cos(y) > cos(x)).all())  # every token moved towards the direction


def test_erase_removes_positive_projection_only():
    h = torch.randn(50, 6)
    t = torch.randn(6)
    out = erase(h, t[None], 1.0)
    proj = h @ t
    assert bool(((out @ t)[proj > 0].abs() < 1e-4).all())
    assert torch.equal(out[proj <= 0], h[proj <= 0])


def test_pvp_fit_shapes_provenance_and_hook_removal(llava):
    model, images, inputs = llava
    items = [PvPItem(im, "what color is the circle ?", "what color are most circles ?") for im in images]
    states = last_token_states(model, ["<image> what color is the circle ?"] * len(images), images)
    assert states.shape == (4, model.n_layers, model.hidden_size)
    fitted = PvP().fit(model, items, layer=1, alpha=2.0, direction="priors")
    prov = fitted.provenance
    assert prov["layers"]["haltrace"] == "resid_post.1" and prov["layers"]["hf_hidden_states_index"] == "2"
    assert prov["alpha"] == -2.0 and len(prov["data"]["fingerprint"]) == 16
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    with fitted.apply(model):
        assert not torch.allclose(_logits(model, inputs), before)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)


def test_pvp_validation(llava):
    model, images, _ = llava
    items = [PvPItem(im, "a", "b") for im in images]
    with pytest.raises(ValueError, match="direction"):
        PvP().fit(model, items, direction="sideways")
    with pytest.raises(ValueError, match="out of range"):
        PvP().fit(model, items, layer=9, alpha=1.0)
    with pytest.raises(ValueError, match="prior and pixel"):
        PvP().fit(model, items)  # choosing the layer needs labelled items


def test_vti_directions_and_hooks(llava):
    model, images, inputs = llava
    pixels = torch.randn(3, 28, 28)
    masked = mask_patches(pixels, 14, 0.99, np.random.default_rng(0))
    assert int((masked != pixels).any(0).float().sum()) > 0
    assert mean_plus_pc1(torch.randn(5, 3, 4)).shape == (3, 4)
    pairs = [CaptionPair(im, "a red circle", "a red circle star", prompt="caption :") for im in images]
    fitted = VTI().fit(model, pairs, alpha_text=2.0, alpha_image=2.0, num_trials=3)
    text = [i for i in fitted.interventions if isinstance(i, RotateTowards)]
    vision = [i for i in fitted.interventions if isinstance(i, VisionRotateTowards)]
    assert len(text) == model.n_layers and all(i.hook.startswith("mlp_out.") for i in text)
    n_vision = len(model.adapter.vision_blocks)
    assert [i.hook for i in vision] == [f"vision_mlp_out.{k}" for k in range(n_vision)]
    assert len(text) + len(vision) == len(fitted.interventions)
    assert not fitted.generate_kwargs  # engine only
    assert n_vision == len(fitted.provenance["layers"]["vision"])
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    with fitted.apply(model):
        assert not torch.allclose(_logits(model, inputs), before)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)
    with pytest.raises(ValueError, match="yes/no"):
        VTI().fit(model, pairs, num_trials=2)


def test_erasure_edits_prefill_only_and_is_removed(llava):
    model, images, inputs = llava
    words = ["circle", "star", "square"]
    dirs = text_representations(model, words, "unembed")
    assert dirs.shape == (3, model.hidden_size)
    assert text_representations(model, words, "resid_post.0").shape == (3, model.hidden_size)
    with pytest.raises(ValueError, match="text_rep"):
        text_representations(model, words, "nowhere")
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    edit = ProjectAwayEdit("resid_post.0", dirs, objects=words, threshold=2.0, weight=3.0, candidates="all")
    with steer(model, edit):
        steered = _logits(model, inputs)
        out = model.hf.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    log = edit.log
    assert log and all(row == words for row in log)  # threshold 2 > any probability: everything erased
    assert not torch.allclose(steered, before)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)


def test_erasure_fit_with_explicit_choices(llava):
    model, images, _ = llava
    data = [CaptionItem(im, objs) for im, objs in zip(images, [["circle"], ["star"], ["circle"], ["square"]],
                                                      strict=True)]
    fitted = ProjectAway().fit(model, data, objects=["circle", "star", "square"], edit_layer=1,
                               text_rep="unembed", weight=1.0, prompt="caption :", candidates="all",
                               caption_tokens=3)
    prov = fitted.provenance
    assert prov["layers"]["edit"]["haltrace"] == "resid_post.1" and prov["phase"].startswith("prompt")
    assert 0.0 <= prov["detection"]["auroc"] <= 1.0 and prov["threshold"] == prov["detection"]["threshold"]
    with pytest.raises(ValueError, match="objects"):
        ProjectAway().fit(model, [CaptionItem(im, []) for im in images], prompt="caption :")


def test_vista_vectors_sla_and_identity(llava):
    model, _, inputs = llava
    vsv = steering_vectors(model, dict(inputs))
    assert vsv.shape == (2, model.n_layers, model.hidden_size)
    assert default_sla_layers(32) == list(range(25, 31)) and default_sla_layers(4) == [1, 2]
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    with VISTA().fit(model, lam=0.0, gamma=0.0).apply(model):
        assert torch.allclose(_logits(model, inputs), before, atol=1e-6)
    fitted = VISTA().fit(model, task="caption", gamma=0.3, sla_layers=[0])
    with fitted.apply(model):
        steered = _logits(model, inputs)
        out = model.hf.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not torch.allclose(steered, before) and out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)
    with pytest.raises(ValueError, match="gamma"):
        VISTA().fit(model, gamma=2.0)
    with pytest.raises(ValueError, match="SLA layers"):
        VISTA().fit(model, sla_layers=[7])


def test_vista_text_only_prompt_after_an_image_batch(llava):
    """A text-only batch after an image batch (the refusal eval) is left unsteered, not given stale vectors."""
    model, _, inputs = llava
    text = model.prepare(["what color is the circle ?"] * 3)
    before = _logits(model, text)
    fitted = VISTA().fit(model, task="caption", gamma=0.0)  # VSV only: SLA would change text-only logits too
    with fitted.apply(model):
        _logits(model, inputs)  # image batch of 2 computes 2 vectors
        after = _logits(model, text)  # batch of 3 without image: no vectors apply
    assert torch.allclose(after, before, atol=1e-6)


def test_restored_hooks_check_what_the_file_holds(llava):
    """A saved state is untrusted input: another model's width, NaN, or a layer the model lacks fail clearly."""
    model, _, inputs = llava
    before, n_hooks, d = _logits(model, inputs), _hook_count(model), model.hidden_size
    state = to_state(ProjectAwayEdit("resid_post.0", torch.randn(2, d + 3), objects=["circle", "star"],
                                     threshold=0.5))
    with pytest.raises(ValueError, match=rf"\(2, {d + 3}\).*\(2, {d}\)"):
        with steer(model, from_state(state)):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        from_state({**state, "directions": torch.full((2, d), float("nan"))})
    with pytest.raises(ValueError, match="out of range"):
        with steer(model, from_state({**state, "directions": torch.randn(2, d), "hook": "resid_post.99"})):
            pass
    n_vision = len(model.adapter.vision_blocks)
    width = model.adapter.vision_hidden_size
    with pytest.raises(ValueError, match="out of range"):  # a saved VTI fit for a deeper vision tower
        with steer(model, VisionRotateTowards(f"vision_mlp_out.{n_vision}", torch.randn(5, width), alpha=0.1)):
            pass
    with pytest.raises(ValueError, match=f"width {width + 1}.*width is {width}"):
        with steer(model, VisionRotateTowards("vision_mlp_out.0", torch.randn(5, width + 1), alpha=0.1)):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        from_state(to_state(VisionRotateTowards("vision_mlp_out.0", torch.randn(5, width), alpha=0.1)) | {
            "alpha": float("inf")})
    with pytest.raises(ValueError, match="NaN or inf"):
        VisionRotateTowards("vision_mlp_out.0", torch.full((5, width), float("nan")), alpha=0.1)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)  # nothing left behind


def test_fitted_attach_is_a_removable_handle(llava):
    from haltrace.steering.engine import Add
    from haltrace.steering.registry import FittedIntervention

    model, _, inputs = llava
    words = ["circle", "star"]

    def edit(directions):
        return ProjectAwayEdit("resid_post.0", directions, objects=words, threshold=2.0, weight=3.0,
                               candidates="all")

    with steer(model, edit(text_representations(model, words))):
        _logits(model, inputs)  # transformers adds its own output-capturing hooks on a first such forward
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    fitted = FittedIntervention("test", [Add("resid_post.0", torch.ones(model.hidden_size), alpha=2.0),
                                         edit(text_representations(model, words))], {})
    handle = fitted.attach(model)
    assert handle.active and _hook_count(model) > n_hooks
    assert not torch.allclose(_logits(model, inputs), before)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active and _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)
    # the erasure refuses this model after the add was validated: nothing of either stays
    bad = FittedIntervention("test", [fitted.interventions[0], edit(torch.randn(2, model.hidden_size + 1))], {})
    with pytest.raises(ValueError, match="hidden size"):
        bad.attach(model)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)
