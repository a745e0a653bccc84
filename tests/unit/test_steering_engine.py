"""The intervention engine: edits land on the right tokens, under the KV cache, and never leave hooks behind."""

from __future__ import annotations

import pytest
import torch

from haltrace.steering.engine import Add, NormPreservingAdd, Project, ScaleHeads, attach, steer
from haltrace.trace.capture import temporary_hooks


def _hook_snapshot(model) -> dict:
    """Every hook id on every module. transformers 5 installs its own permanent output-capturing hooks the first
    time output_hidden_states is used, so "no haltrace hook left" means "same hooks as before"."""
    return {name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for name, m in model.hf.named_modules()}


@pytest.fixture()
def llama(tiny_llama, tiny_inputs):
    return tiny_llama, tiny_inputs("llama")


def _logits(model, inputs):
    with torch.no_grad():
        return model.hf(**inputs).logits


def test_add_changes_outputs_and_is_removed(llama):
    model, inputs = llama
    before = _logits(model, inputs)
    v = torch.randn(model.hidden_size)
    with steer(model, Add("resid_post.0", v, alpha=3.0)):
        steered = _logits(model, inputs)
    assert not torch.allclose(before, steered)
    assert torch.equal(_logits(model, inputs), before)


def test_add_equals_manual_hook_at_last_position(llama):
    model, inputs = llama
    v = torch.randn(model.hidden_size)
    last = inputs["attention_mask"].shape[1] - 1  # left padding: the last prompt token is the last column

    def manual(_m, _a, out):
        out = out.clone()
        out[:, last] += 2.0 * v
        return out

    with temporary_hooks(forward=[(model.adapter.layers[1], manual)]):
        expected = _logits(model, inputs)
    with steer(model, Add("resid_post.1", v, alpha=2.0, positions="last")):
        got = _logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)


def test_generation_phase_is_correct_under_kv_cache(llama):
    model, inputs = llama
    v = torch.randn(model.hidden_size) * 2
    prompt_len = inputs["input_ids"].shape[1]
    with steer(model, Add("resid_pre.1", v, phase="generation")):
        out = model.hf.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
    # reference: no cache, full forward over prompt + generated prefix, add only at positions >= prompt_len
    for step, step_logits in enumerate(out.logits):
        seq = out.sequences[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], step, dtype=torch.long)], 1)

        def manual(_m, args):
            x = args[0].clone()
            x[:, prompt_len:] += v
            return (x, *args[1:])

        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        with temporary_hooks(pre=[(model.adapter.layers[1], manual)]), torch.no_grad():
            ref = model.hf(input_ids=seq, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]
        assert torch.allclose(step_logits, ref, atol=1e-4), f"step {step}"


def test_phases_without_attention_mask(llama):
    """generate() without an attention mask passes only the KV cache (transformers 5.2x names it ``cache``,
    not ``past_key_values``): decoding steps must still count as the generation phase."""
    model, inputs = llama
    ids = inputs["input_ids"][-1:]  # one row, no padding, so no mask is needed
    prompt_len = ids.shape[1]
    v = torch.randn(model.hidden_size) * 2
    steps = []
    with steer(model, Add("resid_post.0", v, phase="generation")), temporary_hooks(
            pre=[(model.hf, lambda _m, _a, kw: steps.append(sorted(kw)))], with_kwargs=True):
        out = model.hf.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert "attention_mask" not in steps[1], "this test needs a decoding step without a mask"
    for step, step_logits in enumerate(out.logits):
        seq = out.sequences[:, : prompt_len + step]

        def manual(_m, _a, o):
            o = o.clone()
            o[:, prompt_len:] += v
            return o

        with temporary_hooks(forward=[(model.adapter.layers[0], manual)]), torch.no_grad():
            ref = model.hf(input_ids=seq, use_cache=False).logits[:, -1]
        assert torch.allclose(step_logits, ref, atol=1e-4), f"step {step}"
    assert not torch.allclose(out.logits[1], out.logits[0])


def test_prompt_phase_leaves_decoding_steps_alone(llama):
    model, inputs = llama
    v = torch.randn(model.hidden_size) * 3
    outs = []
    with steer(model, Add("resid_post.0", v, phase="prompt")) as handle:
        with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: outs.append(o.detach()))]):
            gen = model.hf.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                    pad_token_id=0)
        assert handle.active
    assert not handle.active
    prompt_len = inputs["input_ids"].shape[1]
    assert [o.shape[1] for o in outs] == [prompt_len, 1, 1]
    # layer 0's output at a decode step depends only on (unsteered) embeddings, so with prompt-phase steering
    # it must equal an unsteered recompute; the prefill output carries +v
    mask = torch.cat([inputs["attention_mask"], torch.ones(gen.shape[0], 2, dtype=torch.long)], 1)
    ref = []
    with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: ref.append(o.detach()))]), \
            torch.no_grad():
        model.hf(input_ids=gen[:, :-1], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    for step, out in enumerate(outs[1:], start=1):
        assert torch.allclose(out[:, 0], ref[0][:, prompt_len + step - 1], atol=1e-4)
    assert torch.allclose(outs[0][:, -1] - v, ref[0][:, prompt_len - 1], atol=1e-4)


def test_project_removes_the_component(llama):
    model, inputs = llama
    d = torch.randn(model.hidden_size)
    seen = {}

    def grab(_m, _a, out):
        seen["x"] = out

    with steer(model, Project("resid_post.0", d)):
        with temporary_hooks(forward=[(model.adapter.layers[0], grab)]):
            _logits(model, inputs)
    # hooks run in registration order: steering first, then the spy sees the edited output
    assert (seen["x"] @ (d / d.norm())).abs().max() < 1e-4


def test_norm_preserving_add_keeps_norms(llama):
    model, inputs = llama
    seen = {}
    with steer(model, NormPreservingAdd("resid_post.0", torch.randn(model.hidden_size), alpha=5.0)):
        with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: seen.setdefault("x", o))]):
            _logits(model, inputs)
    with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: seen.setdefault("y", o))]):
        _logits(model, inputs)
    assert torch.allclose(seen["x"].norm(dim=-1), seen["y"].norm(dim=-1), rtol=1e-4)
    assert not torch.allclose(seen["x"], seen["y"])


def test_scale_heads_zero_equals_removing_them(llama):
    model, inputs = llama
    heads = list(range(model.n_heads))
    with steer(model, ScaleHeads("head_out.0", heads=heads, factor=0.0)):
        zeroed = _logits(model, inputs)

    def zero_attn(_m, _a, out):
        bias = model.adapter.o_proj(0).bias
        z = torch.zeros_like(out[0]) + (bias if bias is not None else 0)
        return (z, *out[1:]) if isinstance(out, tuple) else z

    with temporary_hooks(forward=[(model.adapter.attention(0), zero_attn)]):
        expected = _logits(model, inputs)
    assert torch.allclose(zeroed, expected, atol=1e-5)


def test_image_positions_only_touch_image_tokens(tiny_llava, tiny_inputs):
    model = tiny_llava
    inputs = tiny_inputs("llava")
    image = model.image_token_mask(inputs["input_ids"])
    seen = {}
    v = torch.ones(model.hidden_size)
    with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: seen.setdefault("base", o))]):
        _logits(model, inputs)
    with steer(model, Add("resid_post.0", v, positions="image")):
        with temporary_hooks(forward=[(model.adapter.layers[0], lambda m, a, o: seen.setdefault("steer", o))]):
            _logits(model, inputs)
    diff = (seen["steer"] - seen["base"]).abs().sum(-1) > 1e-6
    assert torch.equal(diff, image)


def test_add_to_one_head_equals_attn_out_shift(llama):
    model, inputs = llama
    head, v = 1, torch.randn(model.head_dim)
    with steer(model, Add("head_out.0", v, alpha=2.0, head=head)):
        got = _logits(model, inputs)
    weight = model.adapter.o_proj(0).weight  # o_proj is linear: a head-slice shift = W_O[:, slice] @ shift
    shift = weight[:, head * model.head_dim:(head + 1) * model.head_dim] @ (2.0 * v)
    with steer(model, Add("attn_out.0", shift.detach())):
        expected = _logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (lambda m: Add("head_out.0", torch.randn(m.head_dim)), r"o_proj input"),
    (lambda m: Add("resid_post.0", torch.randn(m.hidden_size), head=0), "head= only applies"),
    (lambda m: Add("resid_post.0", torch.randn(m.hidden_size + 3)), r"size \d+ != model size \d+"),
    (lambda m: Add("resid_post.99", torch.randn(m.hidden_size)), r"layers 0\.\.\d"),
    (lambda m: Add("resid_post.0", torch.full((m.hidden_size,), float("nan"))), "NaN or inf"),
    (lambda m: Add("resid_post.0", torch.randn(m.hidden_size), alpha=float("inf")), "NaN or inf"),
    (lambda m: Add("attn_pattern.0", torch.randn(m.hidden_size)), "cannot steer"),
    (lambda m: ScaleHeads("head_out.0", heads=[99], factor=2.0), "heads"),
])
def test_bad_interventions_are_clear_errors(llama, bad, match):
    model, _ = llama
    before = _hook_snapshot(model)
    with pytest.raises(ValueError, match=match):
        attach(model, bad(model))
    assert _hook_snapshot(model) == before


def test_exception_inside_steering_leaves_model_pristine(llama):
    model, inputs = llama
    before = _logits(model, inputs)
    hooks_before = _hook_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, Add("resid_post.0", torch.randn(model.hidden_size), alpha=10.0)):
            _logits(model, inputs)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, inputs), before)
    assert _hook_snapshot(model) == hooks_before


def test_steering_inside_inference_mode(llama):
    """Serving code often runs everything under torch.inference_mode(): a vector created there has no version
    counter, and an in-place change to the intervention's vector must still reach the next forward."""
    model, inputs = llama
    with torch.inference_mode():
        v = torch.randn(model.hidden_size)
        bare = model.hf(**inputs).logits
        item = Add("resid_post.0", v, alpha=1.0)
        with steer(model, item):
            first = model.hf(**inputs).logits
            item.vector.mul_(3.0)
            second = model.hf(**inputs).logits
        with steer(model, Add("resid_post.0", 3.0 * v, alpha=1.0)):
            expected = model.hf(**inputs).logits
    assert not torch.allclose(first, bare)
    assert torch.allclose(second, expected, atol=1e-6)
    assert not torch.allclose(second, first)
