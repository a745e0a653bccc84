"""Acceptance matrix: every registered steering method x every tiny model family.

For each pair the fit data is built as typed items, written to JSONL (images saved as PNG files), loaded back
with ``load_items(..., images=DIR)`` and fitted; the fit is then applied inside ``model.hf.generate`` for a few
tokens. Every hook on every module must be gone afterwards, also when an exception is raised inside ``apply``.
Pairs a method cannot serve (a VLM-only method on a text-only family) must be refused at ``fit``, before any
forward, with a ``ValueError`` naming the method, the family and the reason.

The tiny models are random, so the data is plumbing, not a claim: TruthPrInt's yes/no labels are chosen from
the model's own answers so that its detector has hallucinated and truthful answers to learn from.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from haltrace.data import (
    CaptionItem,
    CaptionPair,
    PvPItem,
    VQAQuestion,
    YesNoQuestion,
    load_items,
    save_items,
)
from haltrace.models.prompting import build_prompt
from haltrace.models.tiny import TINY_FAMILIES, tiny_image
from haltrace.steering.engine import Gated, Intervention, LinearDetector
from haltrace.steering.fitdata import TRUTHPRINT_FIT_SEED, image_split, question_states, says_yes
from haltrace.steering.registry import FittedIntervention, get_method, list_methods
from haltrace.steering.truthprint import gate_of

VLM_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3")
TEXT_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
#: methods that contrast or edit something about the image: refused on text-only families
VLM_ONLY = ("erasure", "pvp", "vhr", "vista", "vti")
#: methods that work on a text-only model
TEXT_OK = ("caa", "dola", "iti", "truthprint")

COLORS = ("red", "green", "blue", "yellow", "black", "white")
SHAPES = ("circle", "square", "triangle", "star")
TAILS = ("?", ".", ",", "the", "a", "one", "two", "three", "left", "right", "top", "bottom")
N_NEW = 3


def test_the_matrix_covers_every_registered_method_and_family():
    assert set(TINY_FAMILIES) == set(VLM_FAMILIES) | set(TEXT_FAMILIES)
    assert set(list_methods()) == set(VLM_ONLY) | set(TEXT_OK) == set(PLANS)


# --------------------------------------------------------------------------------------- hooks

def _ours(hooks: dict) -> list[int]:
    """Hook ids, less the output-capturing hooks transformers installs (for good) on a model's first forward."""
    return [k for k, fn in hooks.items() if getattr(fn, "__module__", "") != "transformers.utils.output_capturing"]


def _hook_state(model) -> dict[str, tuple[int, ...]]:
    """Per module: forward, pre, with-kwargs, always-called and backward hooks; plus torch's global hooks."""
    from torch.nn.modules import module as nn_module

    state = {}
    for name, m in model.hf.named_modules():
        fwd = _ours(m._forward_hooks)
        state[name] = (len(fwd), len(m._forward_pre_hooks), len(set(fwd) & set(m._forward_hooks_with_kwargs)),
                       len(m._forward_pre_hooks_with_kwargs), len(set(fwd) & set(m._forward_hooks_always_called)),
                       len(m._backward_hooks), len(m._backward_pre_hooks))
    state["<global>"] = (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks),
                         len(nn_module._global_backward_hooks))
    return state


class _Boom(LogitsProcessor):
    """Raises at the ``after``-th decoding step: an error in the middle of a steered ``generate``."""

    def __init__(self, after: int = 1):
        self.after, self.calls = after, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom inside apply")
        return scores


@dataclass
class _FailsOnInstall(Intervention):
    """Fails while the engine installs the fit (after the method's own edits were checked)."""

    def edit(self, x, mask):  # pragma: no cover - never installed
        return x

    def validate(self, model):
        raise RuntimeError("install failed")


# --------------------------------------------------------------------------------------- data

def _question(i: int) -> str:
    return f"is there a {COLORS[i % len(COLORS)]} {SHAPES[i % len(SHAPES)]} {TAILS[i % len(TAILS)]}"


def _roundtrip(tmp_path: Path, items: list[Any]) -> list[Any]:
    """Write ``items`` to JSONL with their in-memory images saved as PNG files, and load them back."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    names: list[str | None] = []
    for k, it in enumerate(items):
        image = getattr(it, "image", None)
        if image is None:
            names.append(None)
            continue
        name = f"{k:03d}.png"
        image.save(folder / name)
        names.append(name)
    path = save_items(tmp_path / "fit.jsonl", items, names)
    loaded = load_items(path, images=folder)
    assert [type(it) for it in loaded] == [type(it) for it in items]
    assert all(isinstance(getattr(it, "image", None), (Path, type(None))) for it in loaded)
    return loaded


def _yesno(model, n: int = 12) -> list[YesNoQuestion]:
    """``n`` yes/no questions (one image each on a VLM), present and absent objects alternating."""
    return [YesNoQuestion(_question(i), "yes" if i % 2 == 0 else "no",
                          image=tiny_image(i) if model.is_vlm else None, image_id=i,
                          object=SHAPES[i % len(SHAPES)], category=None if i % 2 == 0 else "partner")
            for i in range(n)]


def _truthprint_questions(model, n_yes: int = 20, n_no: int = 8) -> list[YesNoQuestion]:
    """Questions labelled from the model's own answers so TruthPrInt finds what it needs in them: real and
    hallucinated "yes" answers on both sides of its split by image, and truthful "no" answers to absent objects.

    The image ids (TruthPrInt's split key) are handed out after the model has answered, so that each kind of
    answer lands on both sides of the split whatever the random model says."""
    pool = _yesno(model, 72)
    logits, _ = question_states(model, pool, [])
    says = says_yes(model, logits)
    assert says.sum() >= n_yes and (~says).sum() >= n_no, f"{model.name_or_path}: too uniform answers {says}"
    yes = [q for q, s in zip(pool, says, strict=True) if s][:n_yes]
    no = [q for q, s in zip(pool, says, strict=True) if not s][:n_no]
    held = image_split(list(range(n_yes + n_no)), seed=TRUTHPRINT_FIT_SEED)
    held_ids = [i for i in range(n_yes + n_no) if held[i]]
    fit_ids = [i for i in range(n_yes + n_no) if not held[i]]
    half = len(held_ids) // 2
    assert half >= 4, held_ids
    yes_ids = held_ids[:half] + fit_ids[:n_yes - half]  # "yes" answers: real and hallucinated, alternating
    no_ids = held_ids[half:] + fit_ids[n_yes - half:]
    out = [replace(q, image_id=i, label="yes" if k % 2 == 0 else "no")
           for k, (q, i) in enumerate(zip(yes, yes_ids, strict=True))]
    out += [replace(q, image_id=i, label="no") for q, i in zip(no, no_ids, strict=True)]
    return [replace(q, category="partner" if q.label == "no" else None) for q in out]


def _pvp(model) -> list[Any]:
    items: list[Any] = [PvPItem(tiny_image(i), f"what color is this {SHAPES[i % 4]} ?",
                                f"what color are most {SHAPES[i % 4]} ?", prior=COLORS[i % 6],
                                pixel=COLORS[(i + 1) % 6], image_id=i) for i in range(4)]
    items.append(VQAQuestion("what color is the circle ?", "red", image=tiny_image(9)))
    return items


def _caption_pairs(model) -> list[Any]:
    pairs = [CaptionPair(tiny_image(i), f"a {COLORS[i]} circle", f"a {COLORS[i]} circle and a star",
                         image_id=i, prompt="describe the image") for i in range(3)]
    return pairs + _yesno(model, 4)


def _captions(model) -> list[Any]:
    objects = [["circle"], ["star"], ["square", "circle"]]
    return [CaptionItem(tiny_image(i), objects[i], image_id=i, prompt="describe the image") for i in range(3)]


def _vhr_items(model) -> list[Any]:
    return _captions(model) + _yesno(model, 3)


# method -> (items builder or None, fit options). Explicit layers/strengths keep the selection grids small.
Plan = tuple[Callable[[Any], list[Any]] | None, dict[str, Any]]
PLANS: dict[str, Plan] = {
    "caa": (_yesno, {"layer": 1, "multiplier": 4.0}),
    "dola": (None, {"layers": "high"}),  # a decoding strategy: it learns nothing and refuses data
    "erasure": (_captions, {"edit_layer": 0, "text_rep": "unembed", "weight": 2.0, "threshold": 2.0,
                            "candidates": "all", "caption_tokens": N_NEW}),
    "iti": (_yesno, {"k": 2, "alpha": 15.0}),
    "pvp": (_pvp, {"layer": 1, "alpha": 4.0}),
    # the yes/no variant: random tiny models' captions hold no object words to label (the caption variant, the
    # default, is tested on the organism in test_truthprint.py)
    "truthprint": (_truthprint_questions, {"variant": "yesno", "thresholds": (0.3, 0.6), "alphas": (0.5, 1.0)}),
    "vhr": (_vhr_items, {"layers": [0, 1]}),
    "vista": (None, {"task": "caption", "sla_layers": [0]}),
    "vti": (_caption_pairs, {"alpha_text": 4.0, "alpha_image": 4.0, "num_trials": 2}),
}


def _fit_data(method: str, model, tmp_path: Path) -> tuple[list[Any] | None, dict[str, Any]]:
    build, options = PLANS[method]
    if build is None:
        return None, dict(options)
    return _roundtrip(tmp_path, build(model)), dict(options)


def _generate_inputs(model):
    """Two rows of different lengths (left padded), one image each on a VLM."""
    questions = ["what color is the circle ?", "is there a red star in the top left ?"]
    prompts = [build_prompt(model, q, image=model.is_vlm) for q in questions]
    images = [tiny_image(20), tiny_image(21)] if model.is_vlm else None
    return model.prepare(prompts, images)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits


def _generate(model, inputs, fitted, **kw) -> torch.Tensor:
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        return model.hf.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                                 pad_token_id=pad, **fitted.generate_kwargs, **kw)


# --------------------------------------------------------------------------------------- the matrix

PAIRS = [(m, f) for m, f in itertools.product(sorted(PLANS), TINY_FAMILIES)]
RUNS = [(m, f) for m, f in PAIRS if f in VLM_FAMILIES or m in TEXT_OK]
REFUSED = [(m, f) for m, f in PAIRS if (m, f) not in RUNS]


@pytest.mark.parametrize(("method", "family"), RUNS, ids=[f"{m}-{f}" for m, f in RUNS])
def test_fit_from_jsonl_and_generate(method, family, tiny_model, tmp_path):
    model = tiny_model(family)
    data, options = _fit_data(method, model, tmp_path)
    if data is not None and model.is_vlm:  # every item carries its (saved, reloaded) image on a VLM
        assert all(isinstance(it.image, Path) and it.image.is_file() for it in data)
    before = _hook_state(model)
    fitted = get_method(method).fit(model, data, **options)
    assert fitted.method == method
    assert _hook_state(model) == before, "fit left hooks behind"
    assert fitted.interventions and not fitted.generate_kwargs  # every method: engine edits only

    inputs = _generate_inputs(model)
    n_rows, n_prompt = inputs["input_ids"].shape
    plain, plain_logits = _generate(model, inputs, fitted), _logits(model, inputs)
    with fitted.apply(model) as applied:
        assert applied is fitted
        assert _hook_state(model) != before, "apply installed nothing"
        if method == "truthprint":
            gate_of(fitted).detector.reset()
        steered_logits = _logits(model, inputs)
        if method == "truthprint":  # a gate: it scores each row's producing position, shifts where it fires
            stats = dict(gate_of(fitted).detector.stats)
            assert stats["steps"] == n_rows
            assert (stats["fired"] > 0) == (not torch.allclose(steered_logits, plain_logits)), stats
        else:
            assert not torch.allclose(steered_logits, plain_logits), "the fit does not change the model"
        out = _generate(model, inputs, fitted)
    assert out.shape == (n_rows, n_prompt + N_NEW)
    assert torch.equal(out[:, :n_prompt], inputs["input_ids"])
    assert _hook_state(model) == before

    # an exception inside apply (in the middle of a steered generate) leaves no hook behind either
    with pytest.raises(RuntimeError, match="boom inside apply"):
        with fitted.apply(model):
            _generate(model, inputs, fitted, logits_processor=LogitsProcessorList([_Boom(after=1)]))
    assert _hook_state(model) == before
    with pytest.raises(KeyError):
        with fitted.apply(model):
            raise KeyError("raised in the body")
    assert _hook_state(model) == before
    with pytest.raises(RuntimeError, match="install failed"):  # the last install step fails: none stays
        with replace(fitted, interventions=[*fitted.interventions, _FailsOnInstall("resid_post.0")]).apply(model):
            pass
    assert _hook_state(model) == before
    if method == "truthprint":  # the gate's edit path on this family: a gate that always fires
        g, det = gate_of(fitted), gate_of(fitted).detector
        always = Gated(g.inner, LinearDetector(det.layers, det.mean, det.scale, det.weight, det.bias, threshold=0.0))
        gate = FittedIntervention(method, [always])
        with gate.apply(model):
            assert not torch.allclose(_logits(model, inputs), plain_logits)
            assert _generate(model, inputs, gate).shape == out.shape
        assert always.detector.stats["fired"] == always.detector.stats["steps"] == n_rows * (1 + N_NEW)
        assert _hook_state(model) == before
    assert torch.equal(_generate(model, inputs, fitted), plain), "the unsteered model changed"


@pytest.mark.parametrize(("method", "family"), REFUSED, ids=[f"{m}-{f}" for m, f in REFUSED])
def test_vlm_only_methods_refuse_text_only_families_up_front(method, family, tiny_model, tmp_path):
    model = tiny_model(family)
    vlm = tiny_model("llava")  # the data a VLM would take, so the refusal is about the model, not the data
    data, options = _fit_data(method, vlm, tmp_path)
    before = _hook_state(model)
    forwards: list[int] = []
    handle = model.hf.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(ValueError) as err:
            get_method(method).fit(model, data, **options)
        with pytest.raises(ValueError) as err_default:  # also without data (no default source to consult)
            get_method(method).fit(model, **options)
    finally:
        handle.remove()
    assert not forwards, "the refusal must come before any forward"
    assert _hook_state(model) == before
    for message in (str(err.value), str(err_default.value)):
        assert f"({method})" in message, message  # the method, by its registry name
        assert f"text-only {model.adapter.config.model_type} model" in message, message  # the family
        assert "needs a vision-language model (" in message, message  # and why


# --------------------------------------------------------------------------------------- text-only fits

@pytest.mark.parametrize("method", ["iti", "caa", "truthprint"])
def test_text_methods_fit_yesno_questions_without_images(method, tiny_model, tmp_path):
    model = tiny_model("llama")
    build, options = PLANS[method]
    items = _roundtrip(tmp_path, build(model))
    assert all(isinstance(q, YesNoQuestion) and q.image is None for q in items)
    fitted = get_method(method).fit(model, items, **options)
    inputs = model.prepare(["is there a red circle ?", "what color is the star ?"])
    with fitted.apply(model):
        out = _generate(model, inputs, fitted)
    assert out.shape == (2, inputs["input_ids"].shape[1] + N_NEW)
    assert fitted.provenance["data"]["source"] == "given"


def test_iti_head_shift_on_gpt2_conv1d_equals_head_space_shift(tiny_model):
    """GPT-2's output projection is a Conv1D (weight ``[in, out]``): ITI's residual-space image of a head shift
    must read the head's rows, not its columns (the tiny model's square weight hides a wrong transpose)."""
    from haltrace.steering.engine import steer
    from haltrace.steering.iti import head_interventions

    model = tiny_model("gpt2")
    inputs = model.prepare(["is there a red circle ?", "what color is the star in the top left ?"])
    layer, head, hd = 1, 2, model.head_dim
    shift = torch.randn(hd, generator=torch.Generator().manual_seed(0))

    def pre(_m, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] += shift
        return (x,)

    with torch.no_grad():
        handle = model.adapter.o_proj(layer).register_forward_pre_hook(pre)
        try:
            reference = model.hf(**inputs).logits
        finally:
            handle.remove()
        add = head_interventions(model, {(layer, head): shift})[0]
        with steer(model, type(add)(add.hook, add.vector, alpha=1.0, positions="all", phase="both")):
            ours = model.hf(**inputs).logits
    assert torch.allclose(reference, ours, atol=1e-5)


def test_iti_keeps_both_answers_of_a_text_question_on_one_side_of_the_split(tiny_model, tmp_path, monkeypatch):
    """ITI probes every question with both answers appended; a text-only question (no image, no image_id) must
    not have one answer in the probe split and the other in the held-out split that ranks the heads."""
    import haltrace.steering.iti as iti_mod

    model = tiny_model("llama")
    items = [replace(q, image_id=None) for q in _yesno(model)]
    items = _roundtrip(tmp_path, items)
    seen: list[list[Any]] = []
    original = iti_mod.image_split

    def recording(ids, *args, **kw):
        seen.append(list(ids))
        return original(ids, *args, **kw)

    monkeypatch.setattr(iti_mod, "image_split", recording)
    get_method("iti").fit(model, items, k=1)
    (ids,) = seen
    assert len(ids) == 2 * len(items) and ids[0::2] == ids[1::2] and len(set(ids)) == len(items)
