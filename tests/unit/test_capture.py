"""Capture backend (plain PyTorch hooks) against HF's own outputs, on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from haltrace.models.tiny import IMAGE_PROMPTS, TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES)
VLMS = [f for f in FAMILIES if f in IMAGE_PROMPTS]
ATOL = 1e-5


def _hook_snapshot(module: torch.nn.Module) -> dict[str, tuple[list, list]]:
    # transformers 5 installs its own output-capturing hooks (once, when output_hidden_states is first used)
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in module.named_modules()}


def _all_hooks_clear(module: torch.nn.Module, before: dict | None = None) -> bool:
    """No haltrace hook left anywhere (and, given a snapshot, exactly the hooks that were there before)."""
    for m in module.modules():
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            if getattr(fn, "__module__", "").startswith("haltrace"):
                return False
    return before is None or _hook_snapshot(module) == before


@pytest.fixture(scope="module")
def full_capture(tiny_model, tiny_inputs):
    """family -> (model, inputs, Capture of every hook at all positions, with hidden states)."""
    cache = {}

    def get(family):
        if family not in cache:
            model, inputs = tiny_model(family), tiny_inputs(family)
            cache[family] = (model, inputs, model.capture(inputs, model.valid_hooks(), output_hidden_states=True))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_stream_matches_hidden_states(family, full_capture):
    model, _, cap = full_capture(family)
    hs, n = cap.output.hidden_states, model.n_layers
    assert len(hs) == n + 1
    torch.testing.assert_close(cap["resid_pre.0"], hs[0], atol=ATOL, rtol=0)
    for i in range(n - 1):
        torch.testing.assert_close(cap[f"resid_post.{i}"], hs[i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(cap[f"resid_pre.{i + 1}"], cap[f"resid_post.{i}"], atol=ATOL, rtol=0)
    # HF's last entry has the final norm applied (Llama, Gemma, Qwen, GPT-2 alike); ours is the raw block output
    last = cap[f"resid_post.{n - 1}"]
    assert not torch.allclose(last, hs[n], atol=1e-3)
    torch.testing.assert_close(model.adapter.final_norm(last), hs[n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_out_through_o_proj_is_attn_out(family, full_capture):
    model, inputs, cap = full_capture(family)
    batch, seq = inputs["input_ids"].shape
    for i in range(model.n_layers):
        heads = cap[f"head_out.{i}"]
        assert heads.shape == (batch, seq, model.n_heads, model.head_dim)
        merged = model.adapter.o_proj(i)(heads.flatten(-2))
        torch.testing.assert_close(merged, cap[f"attn_out.{i}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_last_positions(family, full_capture):
    model, inputs, full = full_capture(family)
    batch, seq = inputs["input_ids"].shape
    d, h = model.hidden_size, model.n_heads
    cap = model.capture(inputs, ["resid_post.0", "attn_out.1", "mlp_out.0", "head_out.1", "attn_pattern.0"],
                        positions="last")
    assert cap.positions.tolist() == [[seq - 1]] * batch  # left padding -> last column
    assert cap["resid_post.0"].shape == cap["attn_out.1"].shape == cap["mlp_out.0"].shape == (batch, 1, d)
    assert cap["head_out.1"].shape == (batch, 1, h, model.head_dim)
    assert cap["attn_pattern.0"].shape == (batch, h, 1, seq)
    torch.testing.assert_close(cap["resid_post.0"], full["resid_post.0"][:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(cap["attn_pattern.0"], full["attn_pattern.0"][:, :, -1:], atol=ATOL, rtol=0)
    # softmax rows sum to one and never look at left padding
    torch.testing.assert_close(cap["attn_pattern.0"].sum(-1), torch.ones(batch, h, 1), atol=1e-5, rtol=0)
    pad = (inputs["attention_mask"] == 0)[:, None, None, :].expand_as(cap["attn_pattern.0"])
    assert pad.any() and cap["attn_pattern.0"][pad].abs().max() < 1e-6


@pytest.mark.parametrize("family", VLMS)
def test_vision_hooks_and_image_positions(family, full_capture):
    model, inputs, cap = full_capture(family)
    mask = model.image_token_mask(inputs["input_ids"])
    n_img = inputs["input_ids"].shape[0]
    proj = cap["projector_out"]
    assert proj.dim() == 3 and proj.shape[-1] == model.hidden_size
    assert cap["vision_out"].dim() == 3
    if family != "llava_next":  # llava-next adds unpadding + newline tokens after the projector
        assert proj.shape[0] == n_img
        assert int(mask.sum()) == proj.shape[0] * proj.shape[1]
        # the projector output is exactly what sits at the image-token positions of the embedding stream
        torch.testing.assert_close(cap["resid_pre.0"][mask], proj.reshape(-1, proj.shape[-1]), atol=ATOL, rtol=0)
    # vision_out is the projector's input, in processor order (Qwen2.5-VL's window reordering undone)
    vis = cap["vision_out"]
    if family.startswith("qwen"):
        again = model.adapter.projector(vis.reshape(-1, vis.shape[-1])).reshape(proj.shape)
    else:
        again = model.adapter.projector(vis)
    torch.testing.assert_close(again, proj, atol=ATOL, rtol=0)
    img = model.capture(inputs, ["resid_pre.1"], positions="image")
    per_row = int(mask[0].sum())
    assert img.positions.shape == (n_img, per_row)
    assert img["resid_pre.1"].shape == (n_img, per_row, model.hidden_size)
    torch.testing.assert_close(img["resid_pre.1"].reshape(-1, model.hidden_size), cap["resid_pre.1"][mask],
                               atol=ATOL, rtol=0)


def test_position_specs(tiny_llama, tiny_inputs):
    model, inputs = tiny_llama, tiny_inputs("llama")
    seq = inputs["input_ids"].shape[1]
    full = model.capture(inputs, ["resid_post.1"])["resid_post.1"]
    cap = model.capture(inputs, ["resid_post.1"], positions=[0, -1])
    assert cap.positions.tolist() == [[0, seq - 1]] * 2
    torch.testing.assert_close(cap["resid_post.1"], full[:, [0, seq - 1]])
    assert model.capture(inputs, ["resid_post.1"], positions=2).positions.tolist() == [[2], [2]]
    per_row = torch.tensor([[1, 2], [3, 0]])
    cap = model.capture(inputs, ["resid_post.1"], positions=per_row)
    torch.testing.assert_close(cap["resid_post.1"][1, 0], full[1, 3])
    assert model.capture(inputs, ["resid_post.1"], positions="all")["resid_post.1"].shape == full.shape
    # right padding: "last" follows the attention mask, not the last column
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    cap = model.capture({"input_ids": ids, "attention_mask": mask}, ["resid_pre.0"], positions="last")
    assert cap.positions.tolist() == [[2], [1]]


@pytest.mark.parametrize("bad", [99, [0, -99], torch.tensor([[0], [42]])])
def test_position_out_of_range_names_range(tiny_llama, tiny_inputs, bad):
    inputs = tiny_inputs("llama")
    seq = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"valid positions are 0\.\.{seq - 1}"):
        tiny_llama.capture(inputs, ["resid_post.0"], positions=bad)


def test_image_positions_errors(tiny_llama, tiny_inputs):
    with pytest.raises(ValueError, match="image"):
        tiny_llama.capture(tiny_inputs("llama"), ["resid_post.0"], positions="image")


def test_unknown_hook_lists_valid_names(tiny_gpt2, tiny_inputs):
    inputs = tiny_inputs("gpt2")
    with pytest.raises(ValueError, match=r"resid_post\.\{0\.\.1\}"):
        tiny_gpt2.capture(inputs, ["resid_mid.0"])
    with pytest.raises(ValueError, match="layers 0..1"):
        tiny_gpt2.capture(inputs, ["resid_post.7"])
    with pytest.raises(ValueError, match="vision-language"):
        tiny_gpt2.capture(inputs, ["projector_out"])
    assert _all_hooks_clear(tiny_gpt2.hf)


def test_attn_pattern_needs_eager(tiny_model, tiny_inputs):
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        model.capture(tiny_inputs("llama"), ["attn_pattern.0"])
    # other hooks work under sdpa
    assert model.capture(tiny_inputs("llama"), ["resid_post.0"])["resid_post.0"].dim() == 3


def test_capture_aliases_and_output(tiny_gpt2, tiny_inputs):
    cap = tiny_gpt2.capture(tiny_inputs("gpt2"), ["resid_post.-1", "resid_post.1"])
    assert list(cap) == ["resid_post.1"]
    assert "resid_post.-1" in cap and cap["resid_post.-1"] is cap["resid_post.1"]
    assert cap.output.logits.shape[:2] == tiny_inputs("gpt2")["input_ids"].shape
    assert not cap["resid_post.1"].requires_grad


@pytest.mark.parametrize("family", ["llava", "llama", "gpt2"])
def test_exception_inside_capture_leaves_no_hooks(family, tiny_model, tiny_inputs):
    model, inputs = tiny_model(family), tiny_inputs(family)
    with torch.no_grad():
        pristine = model.hf(**inputs).logits
    before = _hook_snapshot(model.hf)  # after a forward: HF may install its own capture hooks on first use

    # 1) a module that blows up mid-forward
    bad = model.adapter.mlp(model.n_layers - 1)

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    bad.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.capture(inputs, model.valid_hooks())
    finally:
        del bad.forward  # back to the class method
    assert _all_hooks_clear(model.hf, before)

    # 2) an exception in the body of the hooks() context manager
    with pytest.raises(KeyError):
        with model.hooks(["resid_post.0", "head_out.0"]) as cap, torch.no_grad():
            model.hf(**inputs)
            assert "resid_post.0" in cap
            raise KeyError("body")
    assert _all_hooks_clear(model.hf, before)

    # 3) a hook that raises: attn_pattern reading weights the module did not return
    attn = model.adapter.attention(0)
    orig = attn.forward
    attn.forward = lambda *a, **k: (orig(*a, **k)[0], None)
    try:
        with pytest.raises(RuntimeError, match="no weights"):
            model.capture(inputs, ["attn_pattern.0", "resid_post.1"])
    finally:
        del attn.forward
    assert _all_hooks_clear(model.hf, before)

    with torch.no_grad():
        torch.testing.assert_close(model.hf(**inputs).logits, pristine, atol=0, rtol=0)


def test_failed_registration_leaves_no_hooks(tiny_model, tiny_inputs, monkeypatch):
    """Hooks registered before a later registration fails are removed too (capture and hooks())."""
    model, inputs = tiny_model("llava"), tiny_inputs("llava")
    before = _hook_snapshot(model.hf)

    def refuse(*_a, **_k):
        raise RuntimeError("no vision hook today")

    monkeypatch.setattr(model.adapter, "vision_site", refuse)
    monkeypatch.setitem(model.adapter.__dict__, "_sites", {})  # sites are cached per adapter: resolve them anew
    with pytest.raises(RuntimeError, match="no vision hook"):
        model.capture(inputs, ["resid_post.0", "mlp_out.1", "projector_out"])
    assert _all_hooks_clear(model.hf, before)
    with pytest.raises(RuntimeError, match="no vision hook"):
        with model.hooks(["resid_pre.0", "projector_out"]):
            pass
    assert _all_hooks_clear(model.hf, before)


def test_parsed_names_are_per_model_shape(tiny_model):
    """Hook lists are parsed once and cached; the cache must not carry one model's shape to another."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from haltrace.models import Model
    from haltrace.trace.capture import parse_hooks

    small, vlm = tiny_model("gpt2"), tiny_model("llava")
    big = Model.from_hf(GPT2LMHeadModel(GPT2Config(n_layer=small.n_layers + 1, n_embd=16, n_head=2,
                                                   vocab_size=64, n_positions=32)), small.tokenizer)
    for model in (small, big, small):
        assert parse_hooks(model, ["resid_post.-1"])[0].layer == model.n_layers - 1
    for _ in range(2):  # an error is never cached as a result
        with pytest.raises(ValueError, match=f"layers 0..{small.n_layers - 1}"):
            parse_hooks(small, [f"resid_post.{small.n_layers}"])
    assert parse_hooks(vlm, ["projector_out"])[0].kind == "projector_out"
    with pytest.raises(ValueError, match="vision-language"):
        parse_hooks(small, ["projector_out"])
    with pytest.raises(TypeError, match="string"):
        parse_hooks(small, ["resid_post.0", 3])


def test_fresh_model_has_no_hooks_after_capture():
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny, build_tiny_inputs

    hf_model, tok = build_tiny("llama", seed=1)
    model = Model.from_hf(hf_model, tok)
    model.capture(build_tiny_inputs("llama", tok), model.valid_hooks(), positions="last")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in hf_model.modules())


def test_qwen2_5_vl_vision_out_undoes_window_order():
    """A 2x4-unit image spans two attention windows, so the tower's window order differs from the processor's."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny

    hf_model, proc = build_tiny("qwen2_5_vl")
    proc.image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 112, patch_size=14,
                                                    merge_size=2, temporal_patch_size=2)
    model = Model.from_hf(hf_model, proc)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 112, 3), dtype=np.uint8))
    inputs = model.prepare([IMAGE_PROMPTS["qwen2_5_vl"]], images=[img])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    cap = model.capture(inputs, ["vision_out", "projector_out", "resid_pre.0"])
    vis, proj = cap["vision_out"], cap["projector_out"]
    assert vis.shape == (1, 32, 32) and proj.shape == (1, 8, 32)
    again = model.adapter.projector(vis.reshape(-1, vis.shape[-1])).reshape(proj.shape)
    torch.testing.assert_close(again, proj, atol=ATOL, rtol=0)
    mask = model.image_token_mask(inputs["input_ids"])
    torch.testing.assert_close(cap["resid_pre.0"][mask], proj.reshape(-1, proj.shape[-1]), atol=ATOL, rtol=0)


def test_hooks_context_accumulates_over_generate(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    with tiny_llama.hooks(["resid_post.1"], accumulate=True) as cap, torch.no_grad():
        tiny_llama.hf.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = cap["resid_post.1"]
    assert len(steps) == 3 and steps[0].shape[1] == inputs["input_ids"].shape[1] and steps[1].shape[1] == 1
    assert _all_hooks_clear(tiny_llama.hf)
