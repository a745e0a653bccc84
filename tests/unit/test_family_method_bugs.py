"""VTI, ProjectAway and VISTA on the tiny Qwen2-VL / Qwen2.5-VL / LLaVA-NeXT models (their image inputs are not
LLaVA's ``[B, 3, H, W]`` alone), and VISTA when generation feeds back an image token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import haltrace.steering.vista as vista_mod
import haltrace.steering.vti as vti_mod
from haltrace.data import CaptionItem, CaptionPair, YesNoQuestion
from haltrace.models.tiny import IMAGE_PROMPTS
from haltrace.steering.engine import steer
from haltrace.steering.erasure import ProjectAway, image_forward_inputs
from haltrace.steering.vista import VISTA, steering_vectors
from haltrace.steering.vti import VTI, VisionRotateTowards

WORDS = ["circle", "star", "square"]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(n)]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits


def _setup(tiny_model, family: str):
    model = tiny_model(family)
    prompt = IMAGE_PROMPTS[family]
    images = _images(3)
    inputs = model.prepare([prompt + " what color is the circle ?"] * 2, images[:2])
    return model, prompt, images, inputs


def _generate(model, inputs, **kw):
    with torch.no_grad():
        return model.hf.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, **kw)


def _vti_data(prompt: str, images, labels=None):
    """Caption pairs (and yes/no questions when ``labels``) as typed fit items."""
    data = [CaptionPair(im, "a red circle", "a red circle star", prompt="caption :") for im in images]
    if labels:
        data += [YesNoQuestion("is there a circle ?", lab, image=im, object="circle",
                               category="partner" if lab == "no" else None)
                 for im, lab in zip(images, labels, strict=True)]
    return data


def _erasure_fit(model, prompt: str, images, present, **kw):
    return ProjectAway().fit(model, [CaptionItem(im, sorted(p)) for im, p in zip(images, present, strict=True)],
                             objects=WORDS, prompt="caption :", **kw)


# --------------------------------------------------------------------------------------- 1. VTI

def test_vti_alpha_image_zero_skips_the_visual_direction(tiny_model, monkeypatch):
    model, prompt, images, _ = _setup(tiny_model, "llava")

    def boom(*_a, **_k):
        raise AssertionError("visual_direction must not run when alpha_image=0")

    monkeypatch.setattr(vti_mod, "visual_direction", boom)
    fitted = VTI().fit(model, _vti_data(prompt, images), alpha_text=2.0, alpha_image=0.0, num_trials=2)
    assert not fitted.generate_kwargs and len(fitted.interventions) == model.n_layers
    assert fitted.provenance["layers"]["vision"] == []
    assert fitted.provenance["visual_direction"].startswith("skipped")
    # choosing over a grid of image strengths that are all 0 needs no visual direction either
    fitted = VTI().fit(model, _vti_data(prompt, images, ["yes", "no", "yes"]), alpha_text=1.0, image_grid=(0.0,),
                       num_trials=2)
    assert fitted.provenance["visual_direction"].startswith("skipped")


def test_mask_patch_rows_fills_the_per_channel_mean():
    from haltrace.steering.vti import mask_patch_rows

    rows = torch.randn(16, 3 * 2 * 4 * 4)
    out = mask_patch_rows(rows, 3, 0.5, np.random.default_rng(0))
    changed = (out != rows).any(1)
    assert int(changed.sum()) == 8
    mean = rows.reshape(16, 3, -1).mean(dim=(0, 2))
    assert torch.allclose(out[changed].reshape(-1, 3, 32), mean[None, :, None].expand(8, 3, 32))
    assert torch.equal(out[~changed], rows[~changed])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_vti_visual_direction_on_non_clip_inputs(tiny_model, family):
    model, prompt, images, inputs = _setup(tiny_model, family)
    pairs = _vti_data(prompt, images)
    text_only = VTI().fit(model, pairs, alpha_text=2.0, alpha_image=0.0, num_trials=2)
    assert text_only.provenance["visual_direction"].startswith("skipped")
    fitted = VTI().fit(model, pairs, alpha_text=0.0, alpha_image=4.0, num_trials=3)
    vision = [i for i in fitted.interventions if isinstance(i, VisionRotateTowards)]
    direction = torch.stack([i.direction for i in vision])
    assert [i.hook for i in vision] == [f"vision_mlp_out.{k}" for k in range(len(model.adapter.vision_blocks))]
    assert direction.shape[0] == len(fitted.provenance["layers"]["vision"]) and not fitted.generate_kwargs
    assert bool(torch.isfinite(direction).all()) and float(direction.norm()) > 0
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    with fitted.apply(model):  # the vision-block hooks fit this family's vision blocks and change the output
        steered = _logits(model, inputs)
        out = _generate(model, inputs)
    assert not torch.allclose(steered, before)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)


def test_vti_qwen_vision_hooks_refuse_another_image_size(tiny_model):
    model, prompt, images, _ = _setup(tiny_model, "qwen2_vl")
    width = model.adapter.vision_hidden_size
    edits = [VisionRotateTowards(f"vision_mlp_out.{k}", torch.randn(5, width), alpha=0.1)
             for k in range(len(model.adapter.vision_blocks))]
    inputs = model.prepare([prompt + " caption"], images[:1])  # 16 patches, the direction holds 5
    with pytest.raises(ValueError, match="5 patches"):
        with steer(model, *edits):
            _logits(model, inputs)


def test_vti_refuses_demo_images_of_different_grids(tiny_model, monkeypatch):
    from transformers import Qwen2VLImageProcessorPil

    model, prompt, _, _ = _setup(tiny_model, "qwen2_vl")
    # an image processor that keeps the images' own sizes, as the real Qwen2-VL one does
    monkeypatch.setattr(model.processor, "image_processor", Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2))
    rng = np.random.default_rng(1)
    mixed = [rng.integers(0, 255, size=(56, 56, 3), dtype=np.uint8),
             rng.integers(0, 255, size=(112, 56, 3), dtype=np.uint8)]
    with pytest.raises(ValueError, match=r"VTI.*qwen2_vl family.*different patch grids"):
        VTI().fit(model, _vti_data(prompt, mixed), alpha_text=1.0, alpha_image=1.0, num_trials=2)


# --------------------------------------------------------------------------------------- 2. extra forwards

def test_image_forward_inputs_keeps_every_image_key():
    ids = torch.ones(1, 3, dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": ids, "pixel_values": torch.zeros(4, 8),
              "image_grid_thw": torch.tensor([[1, 2, 2]]), "mm_token_type_ids": ids, "token_type_ids": ids,
              "image_sizes": torch.tensor([[28, 28]]), "cache": object(), "use_cache": True, "logits_to_keep": 1,
              "return_dict": True, "position_ids": None}
    got = image_forward_inputs(ids, kwargs)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                        "token_type_ids", "image_sizes"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next", "gemma3"])
def test_erasure_fit_and_apply(tiny_model, family):
    model, prompt, images, inputs = _setup(tiny_model, family)
    # threshold 2 > any probability, every candidate (no first pass): every object is erased
    fitted = _erasure_fit(model, prompt, images, [{"circle"}, {"star"}, {"square"}], edit_layer=0,
                          text_rep="unembed", weight=3.0, threshold=2.0, candidates="all", caption_tokens=3)
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    log = fitted.interventions[0].log
    log.clear()
    with fitted.apply(model):
        steered = _logits(model, inputs)
        out = _generate(model, inputs)
    assert not torch.allclose(steered, before)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(log) == 4 and all(row == WORDS for row in log)  # 2 rows x (forward + generate prefill)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next", "gemma3"])
def test_vista_forward_and_generate(tiny_model, family, monkeypatch):
    model, _, _, inputs = _setup(tiny_model, family)
    expected = steering_vectors(model, dict(inputs))
    seen: list[torch.Tensor] = []

    def recording(m, kw):
        seen.append(steering_vectors(m, kw))
        return seen[-1]

    monkeypatch.setattr(vista_mod, "steering_vectors", recording)
    before, n_hooks = _logits(model, inputs), _hook_count(model)
    with VISTA().fit(model, task="caption", sla_layers=[0]).apply(model):
        steered = _logits(model, inputs)
        out = _generate(model, inputs)
    assert not torch.allclose(steered, before)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    # one vector set per prompt batch (forward, generate prefill), each the same as from the processor's inputs
    assert len(seen) == 2 and all(torch.allclose(v, expected, atol=1e-5) for v in seen)
    assert _hook_count(model) == n_hooks and torch.equal(_logits(model, inputs), before)


# --------------------------------------------------------------------------------------- 3. VISTA decoding

class _Force(LogitsProcessor):
    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def test_vista_generate_that_emits_the_image_token(tiny_model, monkeypatch):
    model, _, _, inputs = _setup(tiny_model, "llava")
    image_id = model.adapter.image_token_id
    calls: list[int] = []
    original = vista_mod.steering_vectors

    def counting(m, kw):
        calls.append(int(kw["input_ids"].shape[1]))
        return original(m, kw)

    monkeypatch.setattr(vista_mod, "steering_vectors", counting)
    force = LogitsProcessorList([_Force(image_id)])
    with VISTA().fit(model, task="caption", sla_layers=[0]).apply(model):
        out = _generate(model, inputs, logits_processor=force)
        out2 = _generate(model, inputs, logits_processor=force)
    n_prompt = inputs["input_ids"].shape[1]
    assert out.shape[1] == n_prompt + 3 and bool((out[:, n_prompt:] == image_id).all())
    assert torch.equal(out, out2)
    assert calls == [n_prompt, n_prompt]  # once per prompt (each generate's prefill), never on a decode step
