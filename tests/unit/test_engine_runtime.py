"""The engine as the one runtime: producing positions, reads, gated edits, per-prompt preparation, the logits and
vision-tower sites, saved state per type, and exportability decided by the type."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from haltrace.export.convert import intervention_refusals
from haltrace.steering.engine import Add, Gated, Intervention, LinearDetector, attach, steer
from haltrace.steering.interventions import from_state, register_state_type, state_types, to_state
from haltrace.trace.capture import temporary_hooks


def _snapshot(model) -> dict:
    return {n: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks)) for n, m in model.hf.named_modules()}


def _logits(model, inputs):
    with torch.no_grad():
        return model.hf(**inputs).logits


def test_producing_is_last_real_prompt_token_then_newest(tiny_llama, tiny_inputs):
    """Under generate(): one edit at prefill on each row's last prompt token, then one per decoding step."""
    model, inputs = tiny_llama, tiny_inputs("llama")
    seen: list[tuple[int, list[int]]] = []

    @dataclass
    class Spy(Intervention):
        def edit(self, x, mask):
            seen.append((x.shape[1], mask[..., 0].nonzero()[:, 1].tolist()))
            return x

    with steer(model, Spy("resid_post.0", positions="producing")):
        model.hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert seen[0] == (length, [length - 1, length - 1])  # left padding: the last column for both rows
    assert seen[1:] == [(1, [0, 0]), (1, [0, 0])]


def test_producing_follows_right_padding(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    picked = []

    @dataclass
    class Spy(Intervention):
        def edit(self, x, m):
            picked.append(m[..., 0].nonzero().tolist())
            return x

    with steer(model, Spy("resid_post.0", positions="producing")), torch.no_grad():
        model.hf(input_ids=ids, attention_mask=mask)
    assert picked == [[[0, 3], [1, 1]]]


def test_gated_add_equals_manual_gate(tiny_llama, tiny_inputs):
    """A detector that fires on one row only: the edit lands on that row's producing token, nowhere else."""
    model, inputs = tiny_llama, tiny_inputs("llama")
    d = model.hidden_size
    with torch.no_grad():
        h = model.hf(**inputs, output_hidden_states=True).hidden_states[2][:, -1]  # resid_post.1, producing
    # weight along row 0 minus row 1: fires on exactly one of them
    w = (h[0] - h[1]) / (h[0] - h[1]).norm()
    bias = -float(((h[0] + h[1]) / 2) @ w)
    det = LinearDetector([1], torch.zeros(d), torch.ones(d), w, bias, threshold=0.5)
    v = torch.randn(d)

    def manual(_m, _a, out):
        out = out.clone()
        out[0, -1] += 3.0 * v
        return out

    with temporary_hooks(forward=[(model.adapter.layers[1], manual)]):
        expected = _logits(model, inputs)
    with steer(model, Gated(Add("resid_post.1", v, alpha=3.0, positions="producing"), det)):
        got = _logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert det.stats == {"steps": 2, "fired": 1}


@register_state_type
@dataclass
class _Prepared(Intervention):
    """Runs its own forward per prompt (which must see no edit) and adds that forward's mean state."""

    log: list | None = None
    prepares = True

    def prepare(self, model, ctx):
        with torch.no_grad():
            out = model.hf(**ctx.prompt_inputs(), output_hidden_states=True)
        self.vec = out.hidden_states[1][:, -1]  # unedited resid_post.0 at the last token, per row
        self.log.append(ctx.serial)

    def edit_at(self, x, mask, ctx):
        return x + self.vec[:, None, :].to(x.dtype)


def test_prepare_runs_once_per_prompt_and_its_forward_is_unedited(tiny_llama, tiny_inputs):
    model, inputs = tiny_llama, tiny_inputs("llama")
    with torch.no_grad():
        clean = model.hf(**inputs, output_hidden_states=True).hidden_states[1][:, -1]
    log: list = []
    item = _Prepared("resid_post.0", log=log)
    with steer(model, item):
        model.hf.generate(**inputs, max_new_tokens=3, do_sample=False)
        _logits(model, inputs)
    assert log == [1, 2]  # generate's prefill and the plain forward; no decoding step
    assert torch.allclose(item.vec, clean, atol=1e-6)


def test_logits_site_and_reads(tiny_llama, tiny_inputs):
    """A logits edit that reads resid_post.0: logits + lm_head(resid_post.0), checked by hand."""
    model, inputs = tiny_llama, tiny_inputs("llama")

    @dataclass
    class Mix(Intervention):
        def reads(self, model):
            return ("resid_post.0",)

        def edit_at(self, x, mask, ctx):
            return x + model.adapter.unembed(ctx.reads["resid_post.0"])

    with torch.no_grad():
        out = model.hf(**inputs, output_hidden_states=True)
        expected = out.logits + model.adapter.unembed(out.hidden_states[1])
    with steer(model, Mix("logits")):
        got = _logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)


def test_vision_site_edits_the_tower(tiny_llava, tiny_inputs):
    model, inputs = tiny_llava, tiny_inputs("llava")
    width = model.adapter.vision_hidden_size
    before = _logits(model, inputs)
    with steer(model, Add("vision_mlp_out.0", torch.ones(width), alpha=5.0)):
        got = _logits(model, inputs)
    assert not torch.allclose(before, got)
    with pytest.raises(ValueError, match="token positions"):
        attach(model, Add("vision_mlp_out.0", torch.ones(width), positions="last"))
    assert torch.equal(_logits(model, inputs), before)


def test_hooks_removed_when_an_edit_raises(tiny_llama, tiny_inputs):
    model, inputs = tiny_llama, tiny_inputs("llama")
    before = _snapshot(model)

    @dataclass
    class Boom(Intervention):
        def reads(self, model):
            return ("resid_post.0",)

        def edit_at(self, x, mask, ctx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), steer(model, Boom("resid_post.1", positions="producing")):
        _logits(model, inputs)
    assert _snapshot(model) == before


def test_every_registered_type_round_trips(tiny_llama):
    d = tiny_llama.hidden_size
    det = LinearDetector([0, 1], torch.zeros(2 * d), torch.ones(2 * d), torch.randn(2 * d), 0.1, threshold=0.7)
    gate = Gated(Add("resid_post.1", torch.randn(d), alpha=2.0, positions="producing"), det)
    back = from_state(to_state(gate))
    assert isinstance(back, Gated) and back.inner.alpha == 2.0 and back.positions == "producing"
    assert torch.equal(back.detector.weight, det.weight) and back.detector.threshold == 0.7
    assert {"Add", "Gated", "LinearDetector", "NormPreservingAdd", "Project", "ScaleHeads"} <= set(state_types())
    with pytest.raises(ValueError, match="unknown intervention type 'Nope'"):
        from_state({"type": "Nope"})


def test_export_refuses_any_add_subclass_by_construction():
    @dataclass
    class Sneaky(Add):  # never declared exportable: inherits the refusal
        pass

    assert intervention_refusals(Add("resid_post.2", torch.ones(4))) == []
    assert intervention_refusals(Sneaky("resid_post.2", torch.ones(4)))[0].startswith("Sneaky at resid_post.2 is not")
