"""Generation tracing under the KV cache against fresh no-cache forwards over prompt + generated[:t]."""

from __future__ import annotations

import pytest
import torch

from haltrace.trace.attention import attention_to_image
from haltrace.trace.generation import trace_generation

HOOKS = ["resid_pre.0", "resid_post.1", "head_out.1"]
N_NEW = 3


def _fresh_inputs(inputs, sequences, prompt_length, t):
    """Inputs for a no-cache forward over prompt + generated[:t] (positions from the mask, as generate does)."""
    seq = sequences[:, : prompt_length + t]
    fresh = dict(inputs)
    fresh["input_ids"] = seq
    fresh["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, prompt_length:])], 1)
    fresh["position_ids"] = (fresh["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return fresh


def _no_haltrace_hooks(module: torch.nn.Module) -> bool:
    return not any(getattr(fn, "__module__", "").startswith("haltrace")
                   for m in module.modules() for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()])


@pytest.mark.parametrize("family", ["llava", "llama", "gpt2"])
def test_matches_fresh_forward(family, tiny_model, tiny_inputs):
    model, inputs = tiny_model(family), tiny_inputs(family)
    vlm = model.is_vlm
    hooks = HOOKS + (["projector_out"] if vlm else [])
    tr = trace_generation(model, inputs, hooks, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                          attention_to_image=vlm)
    assert tr.tokens.shape == (2, N_NEW) and len(tr.text) == 2
    assert tr.activations["resid_post.1"].shape == (2, N_NEW, model.hidden_size)
    assert tr.activations["head_out.1"].shape == (2, N_NEW, model.n_heads, model.head_dim)
    assert torch.equal(tr.sequences[:, : tr.prompt_length], inputs["input_ids"])
    for t in range(N_NEW):
        fresh = _fresh_inputs(inputs, tr.sequences, tr.prompt_length, t)
        cap = model.capture(fresh, HOOKS, positions="last", use_cache=False)
        for hook in HOOKS:
            torch.testing.assert_close(tr.activations[hook][:, t], cap[hook][:, 0], atol=1e-4, rtol=0)
        if vlm:
            air = attention_to_image(model, fresh)
            torch.testing.assert_close(tr.image_attention[:, t], air.ratio[:, 0], atol=1e-5, rtol=0)
    if vlm:
        assert tr.image_attention.shape == (2, N_NEW, model.n_layers, model.n_heads)
        want = model.capture(inputs, ["projector_out"])["projector_out"]
        torch.testing.assert_close(tr.vision["projector_out"], want, atol=1e-5, rtol=0)
    assert _no_haltrace_hooks(model.hf)


def test_hooks_removed_on_exception(tiny_llava, tiny_inputs):
    def boom(input_ids, scores):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trace_generation(tiny_llava, tiny_inputs("llava"), HOOKS, max_new_tokens=2, attention_to_image=True,
                         logits_processor=[boom])
    assert _no_haltrace_hooks(tiny_llava.hf)


def test_errors(tiny_model, tiny_inputs):
    llava = tiny_model("llava")
    with pytest.raises(ValueError, match="attn_pattern"):
        trace_generation(llava, tiny_inputs("llava"), ["attn_pattern.0"], max_new_tokens=1)
    with pytest.raises(ValueError, match="eager"):
        trace_generation(tiny_model("llava", "sdpa"), tiny_inputs("llava"), max_new_tokens=1,
                         attention_to_image=True)
    with pytest.raises(ValueError, match="valid hooks"):
        trace_generation(llava, tiny_inputs("llava"), ["resid_post.9"], max_new_tokens=1)
