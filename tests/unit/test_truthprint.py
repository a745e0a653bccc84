"""TruthPrInt on the engine and as the paper describes it: caption-token labels, producing-state detector,
class-mean truthful direction, the paper preset, and the backtracking decoder.

Tiny random models check plumbing; the organism (``organism_folder``) checks the caption fit end to end. Labels on
the organism are the organism's own CHAIR labels; nothing here asserts an effect size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haltrace.data import CaptionItem, YesNoQuestion
from haltrace.errors import InputError
from haltrace.steering.engine import Add, Gated, LinearDetector, steer
from haltrace.steering.registry import FittedIntervention, get_method
from haltrace.steering.truthprint import (
    ChairMatcher,
    caption_mentions,
    gate_of,
    generate_captions,
    generate_with_backtracking,
    paper_layer,
    truthful_gate,
)
from haltrace.steering.truthprint_captions import _stop_ids


@pytest.fixture(scope="module")
def organism(organism_folder):
    import haltrace
    from haltrace.organism.paths import organism_world

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = haltrace.load(organism_folder)
        yield model, organism_world(model)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def caption_fit(organism):
    """A small caption-variant fit on the organism's default fit images (threshold and alpha given: no grid)."""
    from haltrace.organism.fit_data import fit_items

    model, world = organism
    items = fit_items(world, "truthprint", n_images=80)
    fitted = get_method("truthprint").fit(model, items, threshold=0.5, alpha=1.0, max_new_tokens=10)
    return items, fitted


def _gate(d: int, layers=(1,), threshold: float = 0.5, bias: float = 0.0) -> Gated:
    g = torch.Generator().manual_seed(0)
    k = len(layers)
    return truthful_gate(list(layers), torch.zeros(k * d), torch.ones(k * d), torch.randn(k * d, generator=g), bias,
                         torch.randn(d, generator=g), alpha=2.0, threshold=threshold)


# ----------------------------------------------------------------------------- the port: an engine edit
def test_gate_is_the_engine_gated_add(tiny_llama, tiny_inputs, tmp_path):
    from haltrace.steering.results import load_fitted, save_fitted

    d = tiny_llama.hidden_size
    gate = _gate(d, layers=(0, 1), threshold=0.0)
    assert isinstance(gate.inner, Add) and gate.inner.hook == "resid_post.1" and gate.positions == "producing"
    assert isinstance(gate.detector, LinearDetector) and gate.detector.layers == [0, 1]
    fitted = FittedIntervention("truthprint", [gate], {"method": "truthprint"})
    assert not fitted.generate_kwargs
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        base = tiny_llama.hf(**inputs).logits
        with steer(tiny_llama, fitted):  # a plain engine fit: steer() installs it whole
            steered = tiny_llama.hf(**inputs).logits
        back = load_fitted(save_fitted(fitted, tmp_path / "fit")["json"].parent)
        with back.apply(tiny_llama):
            again = tiny_llama.hf(**inputs).logits
    assert not torch.allclose(base[:, -1], steered[:, -1]) and torch.equal(steered, again)
    assert torch.equal(gate_of(back).inner.vector, gate.inner.vector)
    with pytest.raises(ValueError, match="direction width"):
        truthful_gate(0, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d + 1), alpha=1,
                      threshold=0.5)


def test_yesno_variant_is_kept_and_says_it_is_in_distribution(organism):
    from haltrace.organism.fit_data import fit_items

    model, world = organism
    questions = fit_items(world, "truthprint-yesno", n_images=60)
    assert all(isinstance(q, YesNoQuestion) for q in questions)
    fitted = get_method("truthprint").fit(model, questions, variant="yesno", layers=[3], thresholds=(0.5,),
                                          alphas=(1.0,))
    prov = fitted.provenance
    assert prov["variant"] == "yesno" and "in-distribution" in prov["in_distribution"]
    assert isinstance(gate_of(fitted), Gated) and not fitted.generate_kwargs


# ----------------------------------------------------------------------------- bad input
def test_bad_options_name_the_fix(tiny_llava, tiny_llama):
    method = get_method("truthprint")
    with pytest.raises(InputError, match="only preset is 'paper'"):
        method.fit(tiny_llava, preset="published")
    with pytest.raises(InputError, match="variants are caption, yesno"):
        method.fit(tiny_llava, variant="captions")
    with pytest.raises(InputError, match="preset='paper'.*variant='yesno'"):
        method.fit(tiny_llava, preset="paper", variant="yesno")
    forwards: list[int] = []
    handle = tiny_llama.hf.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(InputError, match="text-only.*variant='yesno'"):
            method.fit(tiny_llama, [CaptionItem(None, ["circle"])])
    finally:
        handle.remove()
    assert not forwards
    with pytest.raises(ValueError, match="variant='yesno'"):  # yes/no data given to the caption variant
        method.fit(tiny_llava, [YesNoQuestion("is there a circle ?", "yes", image=None)])


def test_paper_layer_scales_by_relative_depth():
    assert paper_layer(40) == 19 and paper_layer(32) == 15 and paper_layer(4) == 1 and paper_layer(1) == 0


# ----------------------------------------------------------------------------- caption-token labels
class _PieceTokenizer:
    """Sub-word pieces joined as they are (a BPE-like tokenizer): words split over several tokens."""

    PIECES = ["A", " red", " cir", "cle", ",", " two", " squ", "ares", " and", " a", " circle", "."]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_caption_mentions_place_each_chair_object_on_its_first_token(tiny_llava):
    matcher = ChairMatcher.build(["circle", "square", "squares"])
    tok = _PieceTokenizer()
    ids = list(range(len(tok.PIECES)))
    mentions, unplaced = caption_mentions(tok, ids, matcher)
    assert unplaced == 0 and matcher.parse(tok.decode(ids)) == ["circle", "squares", "circle"]
    assert mentions == [(2, "circle"), (6, "squares"), (10, "circle")]  # " cir", " squ", " circle"
    word_level = tiny_llava.tokenizer  # one token per word
    ids = word_level("a red circle , a square and a circle .", add_special_tokens=False)["input_ids"]
    mentions, _ = caption_mentions(word_level, ids, matcher)
    assert [w for _, w in mentions] == ["circle", "square", "circle"]
    assert [word_level.decode([ids[k]]).strip() for k, _ in mentions] == ["circle", "square", "circle"]


def test_official_rules_are_the_project_chair_parse(tiny_llava):
    from haltrace.data.chair_rules import parse_caption, read_synonym_table

    matcher = ChairMatcher.build(None, "official")
    caption = "Two dogs and a puppy near a hot dog stand."
    assert matcher.parse(caption) == parse_caption(caption, read_synonym_table(), "official")
    assert matcher.canonical("puppy") == "dog"


def test_caption_fit_reads_the_state_before_each_object(organism, caption_fit):
    """Labels are CHAIR's on the model's own captions; features are the producing states of the objects."""
    from haltrace.data.chair import chair_metrics

    model, world = organism
    items, fitted = caption_fit
    prov = fitted.provenance
    layers = [int(h.split(".")[1]) for h in prov["detector"]["layers"]]
    caps = generate_captions(model, items, max_new_tokens=10, layers=layers)
    m = chair_metrics([c.text for c in caps], [it.objects for it in items], vocabulary=world.config.kinds)
    assert prov["labels"]["mentions"] + prov["labels"]["unplaced"] == m["mentions"]
    assert prov["labels"]["hallucinated"] == m["hallucinated"] and prov["labels"]["unplaced"] == 0
    # a recorded producing state equals the teacher-forced state one position before the object's first token
    matcher = ChairMatcher.build(world.config.kinds)
    i, cap = next((i, c) for i, c in enumerate(caps) if caption_mentions(model.tokenizer, c.ids, matcher)[0])
    token = caption_mentions(model.tokenizer, cap.ids, matcher)[0][-1][0]
    from haltrace.models.prompting import build_prompt

    inputs = model.prepare([build_prompt(model, items[i].prompt, image=True)], [items[i].image])
    n = inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": torch.tensor([inputs["input_ids"][0].tolist() + cap.ids]),
            "attention_mask": torch.ones(1, n + len(cap.ids), dtype=torch.long)}
    cap_states = model.capture(full, [f"resid_post.{layers[-1]}"])[f"resid_post.{layers[-1]}"][0]
    assert torch.allclose(cap.states[token, -1], cap_states[n + token - 1].float(), atol=1e-4)


def test_caption_direction_is_real_minus_hallucinated_class_means(organism, caption_fit):
    from haltrace.steering.fitdata import image_ids_of, image_split
    from haltrace.steering.truthprint import FIT_SEED, _caption_labels

    model, world = organism
    items, fitted = caption_fit
    gate = gate_of(fitted)
    layer = int(gate.inner.hook.split(".")[1])
    caps = generate_captions(model, items, max_new_tokens=10, layers=[layer])
    where, y, _ = _caption_labels(model, caps, items, ChairMatcher.build(sorted({o for it in items
                                                                                  for o in it.objects})))
    held = image_split(image_ids_of(items), seed=FIT_SEED)
    train = np.array([not held[i] for i, _ in where])
    x = torch.stack([caps[i].states[t, 0] for i, t in where])
    expect = x[torch.from_numpy(train & (y == 0))].mean(0) - x[torch.from_numpy(train & (y == 1))].mean(0)
    assert torch.allclose(gate.inner.vector, expect, atol=1e-5)
    prov = fitted.provenance
    assert prov["direction"]["kind"] == "truthful_minus_hallucinated" and prov["variant"] == "caption"
    assert 0.0 <= prov["detector"]["val_auroc"] <= 1.0
    assert any("ComnHallu" in d for d in prov["deviations"])


def test_paper_preset_fixes_the_published_structure(organism):
    from haltrace.organism.fit_data import fit_items

    model, world = organism
    fitted = get_method("truthprint").fit(model, fit_items(world, "truthprint", n_images=60), preset="paper",
                                          max_new_tokens=10)
    prov = fitted.provenance
    assert prov["preset"] == "paper" and prov["threshold"] == 0.5 and prov["alpha"] == 1.0
    assert prov["detector"]["layers"] == [f"resid_post.{paper_layer(model.n_layers)}"]
    assert prov["detector"]["C"] == 1.0 and prov["selection"]["rule"].startswith("fixed")
    assert any("relative depth" in d for d in prov["deviations"])


# ----------------------------------------------------------------------------- backtracking
def _greedy(model, inputs, n, edits=()):
    with torch.no_grad(), steer(model, *edits) if edits else torch.no_grad():
        out = model.hf.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, eos_token_id=_stop_ids(model),
                                pad_token_id=model.tokenizer.pad_token_id)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    conf = [float(torch.softmax(s[0].float(), -1).max()) for s in out.scores]
    return new, conf


def test_backtracking_cuts_at_the_least_confident_token_and_redecodes_with_the_shift(tiny_llava, tiny_inputs):
    """A detector that always fires: the first object word triggers one backtrack; the caption is cut at the
    least confident token of its sentence before the object, then re-decoded with the gate's Add."""
    from haltrace.steering.truthprint_captions import _word_starts

    model = tiny_llava
    inputs = _one_row(tiny_inputs)
    n_new = 12
    plain, conf = _greedy(model, inputs, n_new)
    tok = model.tokenizer
    texts = [tok.decode(plain[:k], skip_special_tokens=True) for k in range(len(plain) + 1)]
    starts = _word_starts(texts)
    # an "object" vocabulary: the first plain word that starts at token >= 2
    pick = None
    for a, b in zip(starts, starts[1:] + [len(plain)], strict=True):
        word = tok.decode(plain[a:b], skip_special_tokens=True).strip().lower()
        if a >= 2 and word.isalpha() and ChairMatcher.build([word]).parse(texts[b]) == [word]:
            pick = (a, word)
            break
    if pick is None:
        pytest.skip(f"the random model's caption has no usable word: {texts[-1]!r}")
    at, word = pick
    d = model.hidden_size
    gate = truthful_gate([1], torch.zeros(d), torch.ones(d), torch.zeros(d), 5.0, torch.randn(d), alpha=8.0,
                         threshold=0.5)  # p = sigmoid(5) > 0.5 everywhere
    fitted = FittedIntervention("truthprint", [gate], {"backtracking": {"vocabulary": [word],
                                                                        "chair_rules": "simple"}})
    log: list = []
    seq = generate_with_backtracking(model, fitted, inputs, max_new_tokens=n_new, log=log)
    (row,) = log
    assert len(row["backtracks"]) >= 1  # one per sentence at most (a later sentence may backtrack again)
    ends = [k for k in range(at) if any(m in tok.decode(plain[k:k + 1]) for m in ".!?\n")]
    first = ends[-1] + 1 if ends else 0
    expect_r = min(range(first, at), key=lambda k: conf[k]) if first < at else at
    assert row["backtracks"][0]["at"] == at and row["backtracks"][0]["cut_to"] == expect_r
    got = seq[0, inputs["input_ids"].shape[1]:].tolist()
    assert got[:expect_r] == plain[:expect_r]
    # the first re-decoded token is what the shifted model says after the kept prefix
    prefix = {**inputs, "input_ids": torch.tensor([inputs["input_ids"][0].tolist() + plain[:expect_r]]),
              "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + expect_r, dtype=torch.long)}
    shifted, _ = _greedy(model, prefix, 1, [Add(gate.inner.hook, gate.inner.vector, alpha=8.0,
                                                 positions="producing")])
    assert got[expect_r] == shifted[0]


def _one_row(tiny_inputs, row: int = 1):
    full = tiny_inputs("llava")
    inputs = {k: v[row:row + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v for k, v in full.items()}
    keep = inputs["attention_mask"][0].bool()
    return {**inputs, "input_ids": inputs["input_ids"][:, keep], "attention_mask": inputs["attention_mask"][:, keep]}


def test_backtracking_without_detection_is_greedy_decoding(tiny_llava, tiny_inputs):
    model = tiny_llava
    d = model.hidden_size
    never = truthful_gate([1], torch.zeros(d), torch.ones(d), torch.zeros(d), -50.0, torch.randn(d), alpha=8.0,
                          threshold=0.5)
    fitted = FittedIntervention("truthprint", [never], {"backtracking": {"vocabulary": ["the", "a"]}})
    for row in (0, 1):
        inputs = _one_row(tiny_inputs, row)
        seq = generate_with_backtracking(model, fitted, inputs, max_new_tokens=6)
        plain, _ = _greedy(model, inputs, 6)
        assert seq[0, inputs["input_ids"].shape[1]:].tolist()[:len(plain)] == plain
    with pytest.raises(ValueError, match="vocabulary"):  # a fit without a backtracking spec says what to pass
        generate_with_backtracking(model, FittedIntervention("truthprint", [never], {}), inputs)


def test_backtracking_on_the_organism_after_save_and_load(organism, caption_fit, tmp_path):
    from haltrace.steering.results import load_fitted, save_fitted
    from haltrace.steering.truthprint import backtracking_captions

    model, world = organism
    items, fitted = caption_fit
    back = load_fitted(save_fitted(fitted, tmp_path / "fit")["json"].parent)
    assert back.provenance["backtracking"]["vocabulary"] == sorted(world.config.kinds) or \
        set(back.provenance["backtracking"]["vocabulary"]) <= set(world.config.kinds)
    log: list = []
    a = backtracking_captions(model, fitted, items[:6], max_new_tokens=10, log=log)
    b = backtracking_captions(model, back, items[:6], max_new_tokens=10)
    assert a == b and len(log) == 6 and all("checked" in row for row in log)


def test_explain_takes_a_fitted_truthprint_detector(caption_fit):
    from haltrace.explain.core import _resolve_detector

    _, fitted = caption_fit
    det = _resolve_detector(fitted)
    assert det is gate_of(fitted).detector and hasattr(det, "probability")


def test_a_cut_inside_a_word_rescores_that_word_and_a_cut_at_a_word_keeps_the_scores():
    from haltrace.steering.truthprint_captions import _RowState

    tok = _PieceTokenizer()
    det = LinearDetector([0], torch.zeros(2), torch.ones(2), torch.zeros(2), -5.0, threshold=0.5)  # never fires
    matcher = ChairMatcher.build(["circle", "squares"])
    ids = list(range(len(tok.PIECES)))

    def decoded(r):
        row = _RowState(tok, matcher, det, stops=[99], max_backtracks=1)
        for k in range(len(ids)):
            row.ids.append(ids[k])
            row.conf.append(1.0)
            row.feats.append(torch.zeros(2))
            row.step(row.ids, row.feats.__getitem__, redecode=False)
        assert [e["token"] for e in row.events] == [2, 6, 10] and row.checked == {2, 6, 10}
        row.truncate(r)
        return row

    inside = decoded(3)  # " cir|cle": the cut word is re-decoded, so it is scored again
    assert inside.word_start == 2 and inside.checked == set() and inside.seen == []
    at_word = decoded(5)  # " two" starts a word: "circle" stays complete and scored
    assert at_word.word_start == 5 and at_word.checked == {2} and at_word.seen == ["circle"]
