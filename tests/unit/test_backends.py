"""The nnsight and TransformerLens capture backends return what the plain-hooks backend returns.

Tiny random LLaVA and GPT-2 (left-padded batches of 2); every hook each backend supports; positions
``None`` and ``"last"``; nnsight also through its remote path run in-process (``remote="local"``).
"""

from __future__ import annotations

import pytest
import torch

from haltrace.models import Model
from haltrace.models.tiny import build_tiny, build_tiny_inputs
from haltrace.trace.backends import UnsupportedHookError, capture_with, supports

pytest.importorskip("nnsight")
pytest.importorskip("transformer_lens")

ATOL = 1e-4
FAMILIES = ("llava", "gpt2")


@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[Model, object]]:
    out = {}
    for family in FAMILIES:
        hf, proc = build_tiny(family)
        out[family] = (Model.from_hf(hf, proc, name=f"tiny-{family}"), build_tiny_inputs(family, proc))
    return out


def _assert_same(got, ref, hooks, label: str) -> None:
    for hook in hooks:
        assert got[hook].shape == ref[hook].shape, f"{label} {hook}: {tuple(got[hook].shape)} vs {tuple(ref[hook].shape)}"
        err = (got[hook] - ref[hook]).abs().max().item()
        assert err <= ATOL, f"{label} {hook}: max abs diff {err:.3g} > {ATOL}"
    assert (got.output.logits - ref.output.logits).abs().max().item() <= ATOL, f"{label}: logits differ"
    assert got.positions is None if ref.positions is None else torch.equal(got.positions, ref.positions)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", [None, "last"])
@pytest.mark.parametrize("backend, remote", [("nnsight", False), ("nnsight", "local"), ("transformer_lens", False)])
def test_backends_agree_with_hooks(tiny, family, positions, backend, remote, monkeypatch) -> None:
    model, inputs = tiny[family]
    hooks = [h for h in model.valid_hooks() if supports(backend, model, h.split(".")[0])]
    if family == "llava":  # the VLM case must really cover the vision hooks
        assert {"vision_out", "projector_out"} <= set(hooks)
    ref = capture_with(model, inputs, hooks, positions, backend="hooks")
    monkeypatch.setattr(model, "remote", remote)
    got = capture_with(model, inputs, hooks, positions, backend=backend)
    _assert_same(got, ref, hooks, f"{family}/{backend}/remote={remote}/positions={positions}")


def test_remote_local_runs_nnsight_remote_path(tiny, monkeypatch) -> None:
    """remote="local" must go through nnsight's serialize/deserialize backend, not the plain local trace."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    calls = []
    original = LocalSimulationBackend.__call__

    def spy(self, tracer):
        calls.append(tracer)
        return original(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", spy)
    model, inputs = tiny["gpt2"]
    monkeypatch.setattr(model, "remote", "local")
    cap = capture_with(model, inputs, ["resid_post.1"], positions=[0, -1], backend="nnsight")
    assert len(calls) == 1
    ref = model.capture(inputs, ["resid_post.1"], positions=[0, -1])
    torch.testing.assert_close(cap["resid_post.1"], ref["resid_post.1"], atol=ATOL, rtol=0)


def test_tl_bridge_leaves_model_untouched(tiny) -> None:
    """The bridge rewires a module-tree copy; model.hf keeps its modules and shares its weights."""
    from haltrace.trace.backends.tl_backend import bridge_for

    model, inputs = tiny["gpt2"]
    before = {name: type(m) for name, m in model.hf.named_modules()}
    bridge = bridge_for(model)
    assert {name: type(m) for name, m in model.hf.named_modules()} == before
    assert bridge.original_model is not model.hf
    assert bridge.original_model.lm_head.weight is model.hf.lm_head.weight  # no extra weight memory
    assert bridge_for(model) is bridge  # built once


def test_unsupported_hook_names_backend_and_alternatives() -> None:
    hf, proc = build_tiny("qwen2_vl")
    model = Model.from_hf(hf, proc)
    inputs = build_tiny_inputs("qwen2_vl", proc)
    with pytest.raises(UnsupportedHookError, match=r"'nnsight' cannot capture hook 'vision_out'.*hooks"):
        capture_with(model, inputs, ["resid_post.0", "vision_out"], backend="nnsight")
    # the text hooks of the same model work through nnsight
    got = capture_with(model, inputs, ["resid_post.0"], "last", backend="nnsight")
    torch.testing.assert_close(got["resid_post.0"], model.capture(inputs, ["resid_post.0"], "last")["resid_post.0"])


def test_unknown_backend_and_bad_hook(tiny) -> None:
    model, inputs = tiny["gpt2"]
    with pytest.raises(ValueError, match="unknown capture backend"):
        capture_with(model, inputs, ["resid_post.0"], backend="pyvene")
    with pytest.raises(ValueError, match="needs a vision-language model"):
        capture_with(model, inputs, ["projector_out"], backend="nnsight")
    with pytest.raises(RuntimeError, match="did not fire"):
        llava, llava_inputs = tiny["llava"]
        text_only = {k: v for k, v in llava_inputs.items() if k != "pixel_values"}
        capture_with(llava, text_only, ["projector_out"], backend="transformer_lens")


@pytest.mark.parametrize("family", FAMILIES)
def test_ndif_wrapper_matches_through_remote_path(tiny, family, tmp_path, monkeypatch) -> None:
    """The wrapper remote=True would send to NDIF (TransformersModel keyed by the checkpoint), run through
    nnsight's remote path in-process on the same weights saved to a folder: identical hooks, also on GPT-2's
    left-padded rows (nnsight's pipeline would otherwise substitute mask-derived position ids)."""
    from haltrace.trace.backends import nnsight_backend

    model, inputs = tiny[family]
    model.hf.save_pretrained(tmp_path)
    remote_model = Model.from_hf(model.hf, model.processor or model.tokenizer, name=str(tmp_path))
    wrapper = nnsight_backend._ndif_wrapper(remote_model)
    assert type(wrapper).__name__ == "TransformersModel" and wrapper._module is not model.hf
    monkeypatch.setattr(nnsight_backend, "wrapper_for", lambda _model, _remote=None: wrapper)
    monkeypatch.setattr(remote_model, "remote", "local")
    hooks = [h for h in model.valid_hooks() if supports("nnsight", model, h.split(".")[0])]
    got = capture_with(remote_model, inputs, hooks, "last", backend="nnsight")
    _assert_same(got, model.capture(inputs, hooks, "last"), hooks, f"{family}/ndif-wrapper")
