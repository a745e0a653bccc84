"""Unit tests for TruthPrInt, VHR, ITI, CAA and DoLa on tiny random models (plumbing, not claims)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from haltrace.organism.fit_data import fit_items, yesno_questions
from haltrace.steering.caa import CAA, caa_interventions, default_layer
from haltrace.steering.dola import DoLaContrast, candidate_layers, dola_scores
from haltrace.steering.engine import steer
from haltrace.steering.iti import ITI, head_interventions, head_shift_vector
from haltrace.steering.registry import get_method, list_methods
from haltrace.steering.truthprint import truthful_gate
from haltrace.steering.vhr import default_layers, select_heads


def _n_hooks(model) -> int:
    mods = [model.hf, *model.adapter.layers, *(model.adapter.o_proj(i) for i in range(model.n_layers))]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def _gate(model, *, threshold: float, alpha: float = 5.0, layer: int = 0):
    d = model.hidden_size
    g = torch.Generator().manual_seed(0)
    return truthful_gate(layer, torch.zeros(d), torch.ones(d), torch.randn(d, generator=g), 0.0,
                         torch.randn(d, generator=g), alpha=alpha, threshold=threshold)


@pytest.fixture(scope="module")
def organism(random_organism):
    return random_organism


def test_registered():
    assert {"truthprint", "vhr", "iti", "caa", "dola"} <= set(list_methods())


# ------------------------------------------------------------------ TruthPrInt gate (an engine Gated edit)
def test_gate_validation(tiny_llama):
    d = tiny_llama.hidden_size
    with pytest.raises(ValueError, match="len\\(layers\\) \\* hidden size"):
        truthful_gate(0, torch.zeros(d), torch.ones(d), torch.zeros(d + 1), 0.0, torch.zeros(d), alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="len\\(layers\\) \\* direction width"):
        truthful_gate(0, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d + 1), alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="increasing"):
        truthful_gate([1, 0], torch.zeros(2 * d), torch.ones(2 * d), torch.zeros(2 * d), 0.0, torch.zeros(d),
                      alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="probability"):
        truthful_gate(0, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d), alpha=1, threshold=2)
    with pytest.raises(ValueError, match="NaN"):
        truthful_gate(0, torch.full((d,), math.nan), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d),
                      alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="out of range"), steer(tiny_llama, truthful_gate(
            9, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d), alpha=1, threshold=.5)):
        pass


def test_gate_edits_only_the_producing_position(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        base = tiny_llama.hf(**inputs).logits
        gate = _gate(tiny_llama, threshold=0.0)  # p > 0 always: fires everywhere it looks
        with steer(tiny_llama, gate):
            steered = tiny_llama.hf(**inputs).logits
    assert gate.detector.stats == {"steps": 2, "fired": 2}
    real = inputs["attention_mask"][:, :-1].bool()  # pad rows attend everywhere (fully masked): skip them
    assert torch.allclose(base[:, :-1][real], steered[:, :-1][real], atol=1e-5)  # left padding: last is produced
    assert not torch.allclose(base[:, -1], steered[:, -1])
    with torch.no_grad(), steer(tiny_llama, _gate(tiny_llama, threshold=1.0)):  # never fires: identity
        assert torch.allclose(base, tiny_llama.hf(**inputs).logits)


def test_multi_layer_gate_reads_every_block(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    d = tiny_llama.hidden_size
    weight = torch.zeros(2 * d)
    weight[0] = 1.0  # only block 0's first feature decides
    gate = truthful_gate([0, 1], torch.zeros(2 * d), torch.ones(2 * d), weight, 0.0, torch.ones(d), alpha=3.0,
                         threshold=0.5)
    with torch.no_grad():
        h0 = tiny_llama.capture(inputs, ["resid_post.0"], positions="last")["resid_post.0"][:, 0, 0]
        with steer(tiny_llama, gate):
            tiny_llama.hf(**inputs)
    assert gate.inner.hook == "resid_post.1" and gate.detector.stats["fired"] == int((h0 > 0).sum())


def test_gate_under_generation_and_removal(tiny_llava, tiny_inputs):
    inputs = tiny_inputs("llava")
    before = _n_hooks(tiny_llava)
    gate = _gate(tiny_llava, threshold=0.0, layer=1)
    with torch.no_grad(), steer(tiny_llava, gate):
        out = tiny_llava.hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert gate.detector.stats["steps"] == 2 * 3 and gate.detector.stats["fired"] == 6  # prefill + 2 steps, 2 rows
    assert _n_hooks(tiny_llava) == before
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_llava, gate):
        raise RuntimeError("boom")
    assert _n_hooks(tiny_llava) == before


def test_truthprint_without_data_says_what_to_pass(tiny_llava):
    with pytest.raises(ValueError, match="needs fit data.*--fit-data"):
        get_method("truthprint").fit(tiny_llava)
    with pytest.raises(ValueError, match="direction"):
        get_method("truthprint").fit(tiny_llava, direction="sideways")


def test_fit_questions_are_deterministic_and_labelled(organism):
    _, world = organism
    a, b = yesno_questions(world, 6, seed=1), yesno_questions(world, 6, seed=1)
    assert [q.question for q in a] == [q.question for q in b]
    for q in a:
        assert q.question == f"is there a {q.object} ?"
        assert q.present == (q.category == "present") == (q.label == "yes")
    assert any(q.category == "partner" for q in a)


# ------------------------------------------------------------------ VHR
def test_vhr_selection_rules():
    assert default_layers(32) == [1] + list(range(18, 32))
    assert default_layers(4) == [1, 2, 3]
    assert select_heads(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)) == ([2, 3], [])
    # head 3 has the largest VHD *and* text-only energy: an outlier, dropped before the median split
    vhd, ta = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 9.0]), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    sel, out = select_heads(vhd, ta)
    assert out == [5] and 5 not in sel
    assert select_heads(vhd, ta, outlier=False)[0] == [5]


def test_vhr_fit_on_random_organism(organism):
    model, world = organism
    fitted = get_method("vhr").fit(model, fit_items(world, "vhr", n_images=4), heads="fixed")
    assert fitted.method == "vhr" and fitted.interventions
    for item in fitted.interventions:
        assert item.hook.startswith("head_out.") and item.factor == 2.0 and len(item.heads) >= 1
    sample = get_method("vhr").fit(model, fit_items(world, "vhr", n_images=4))  # the paper's per-sample heads
    assert [i.hook for i in sample.interventions] == [f"head_out.{x}" for x in default_layers(model.n_layers)]
    assert all(i.alpha == 2.0 and i.layers == default_layers(model.n_layers) for i in sample.interventions)
    prov = fitted.provenance
    assert {"paper", "layers", "alpha", "positions", "phase", "data", "fingerprint"} <= set(prov)
    with pytest.raises(ValueError, match="out of range"):
        get_method("vhr").fit(model, fit_items(world, "vhr", n_images=2), layers=[7])


# ------------------------------------------------------------------ ITI
def test_iti_attn_out_shift_equals_head_space_shift(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    layer, head, hd = 1, 1, tiny_llama.head_dim
    shift = torch.randn(hd, generator=torch.Generator().manual_seed(0))

    def pre(_m, args):  # the reference: edit the input of o_proj in head space
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] += shift
        return (x,)

    with torch.no_grad():
        handle = tiny_llama.adapter.o_proj(layer).register_forward_pre_hook(pre)
        try:
            reference = tiny_llama.hf(**inputs).logits
        finally:
            handle.remove()
        adds = head_interventions(tiny_llama, {(layer, head): shift})
        whole = [type(a)(a.hook, a.vector, alpha=1.0, positions="all", phase="both") for a in adds[:1]]
        with steer(tiny_llama, *whole):
            ours = tiny_llama.hf(**inputs).logits
    assert torch.allclose(reference, ours, atol=1e-5)
    assert [a.positions for a in adds] == ["last", "all"] and [a.phase for a in adds] == ["prompt", "generation"]


def test_iti_validation(tiny_llama, organism):
    with pytest.raises(ValueError, match="head 99"):
        head_interventions(tiny_llama, {(0, 99): torch.zeros(tiny_llama.head_dim)})
    with pytest.raises(ValueError, match="head_dim"):
        head_shift_vector(torch.eye(4), 0, 2, torch.zeros(3))
    model, world = organism
    with pytest.raises(ValueError, match="k must be"):
        get_method("iti").fit(model, fit_items(world, "iti", n_images=2), k=0)


def test_iti_fit_on_random_organism(organism):
    model, world = organism
    fitted = get_method("iti").fit(model, fit_items(world, "iti", n_images=12), k=2, alpha=5.0)
    assert len(fitted.provenance["heads"]) == 2
    assert all(a.hook.startswith("attn_out.") for a in fitted.interventions)
    assert np.array(fitted.provenance["val_accuracy_by_head"]).shape == (model.n_layers, model.n_heads)


# ------------------------------------------------------------------ CAA
def test_caa_positions_follow_the_instruction_end(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    v = torch.randn(tiny_llama.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_llama.hf(**inputs).logits
        with steer(tiny_llama, *caa_interventions("resid_post.0", v, 4.0)):
            steered = tiny_llama.hf(**inputs).logits
            gen = tiny_llama.hf.generate(**inputs, max_new_tokens=2, do_sample=False)
    real = inputs["attention_mask"][:, :-1].bool()
    assert torch.allclose(base[:, :-1][real], steered[:, :-1][real], atol=1e-5)
    assert not torch.allclose(base[:, -1], steered[:, -1])
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
    assert default_layer(32) == 13 and default_layer(4) == 2


def test_caa_fit_on_random_organism(organism):
    model, world = organism
    fitted = get_method("caa").fit(model, fit_items(world, "caa", n_images=6), layer=1)
    assert fitted.provenance["layer"]["haltrace"] == "resid_post.1"
    assert fitted.provenance["layer"]["hf_hidden_states_index"] == 2
    assert fitted.interventions[0].vector.shape == (model.hidden_size,)
    with pytest.raises(ValueError, match="out of range"):
        get_method("caa").fit(model, fit_items(world, "caa", n_images=2), layer=5)


# ------------------------------------------------------------------ DoLa
def test_dola_layer_buckets():
    assert candidate_layers("high", 32) == list(range(16, 32, 2))
    assert candidate_layers("low", 32) == list(range(0, 16, 2))
    assert candidate_layers("low", 32, tied_embeddings=True)[0] == 2
    assert candidate_layers("high", 48) == list(range(28, 48, 2))
    with pytest.raises(ValueError, match="invalid"):
        candidate_layers([4], 4)
    with pytest.raises(ValueError, match="'low', 'high'"):
        candidate_layers("middle", 4)


def test_dola_scores_math():
    final = torch.tensor([[3.0, 2.9, 0.0, -4.0]])
    cands = torch.stack([torch.tensor([[3.0, 2.9, 0.0, -4.0]]),  # identical to final: zero divergence
                         torch.tensor([[5.0, 0.0, 0.0, 0.0]])])   # confident in token 0 early
    scores, chosen = dola_scores(final, cands, relative_top=0.1)
    assert chosen.tolist() == [1]  # the most divergent premature layer
    assert torch.isinf(scores[0, 2:]).all() and torch.isfinite(scores[0, :2]).all()  # plausibility head
    assert scores[0, 1] > scores[0, 0]  # the token the early layer already liked is penalised
    textbook, _ = dola_scores(final, cands, divergence="jsd")
    assert torch.isfinite(textbook[0, :2]).all()
    with pytest.raises(ValueError, match="divergence"):
        dola_scores(final, cands, divergence="kl")


def test_dola_decoder_forward_generate_and_removal(tiny_llava, tiny_inputs):
    inputs = tiny_inputs("llava")
    before = _n_hooks(tiny_llava)
    fitted = get_method("dola").fit(tiny_llava, layers=[0, 1])
    decoder = fitted.interventions[0]
    assert fitted.generate_kwargs == {}
    with torch.no_grad():
        plain = tiny_llava.hf(**inputs).logits
        with fitted.apply(tiny_llava):
            contrasted = tiny_llava.hf(**inputs).logits
            out = tiny_llava.hf.generate(**inputs, max_new_tokens=3, do_sample=False, **fitted.generate_kwargs)
    top = plain.argmax(-1)
    logp = torch.log_softmax(plain, -1)
    picked = logp.gather(-1, contrasted.argmax(-1)[..., None])[..., 0]
    assert (picked >= logp.max(-1).values + math.log(0.1) - 1e-5).all()  # DoLa picks inside the plausible head
    assert not torch.allclose(plain, contrasted) and torch.isfinite(contrasted.gather(-1, top[..., None])).all()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert sum(decoder.stats["premature"].values()) == decoder.stats["positions"] > 0
    assert _n_hooks(tiny_llava) == before
    with pytest.raises(RuntimeError, match="boom"), fitted.apply(tiny_llava):
        raise RuntimeError("boom")
    assert _n_hooks(tiny_llava) == before
    prov = fitted.provenance
    assert prov["premature_layers"]["haltrace"] == ["resid_pre.0", "resid_post.0"]
    with pytest.raises(ValueError, match="learns nothing"):
        get_method("dola").fit(tiny_llava, data=[1])
    with pytest.raises(TypeError, match="unexpected"):
        get_method("dola").fit(tiny_llava, dola_layer="high")


def test_dola_decoder_bad_layers(tiny_llama):
    with pytest.raises(ValueError, match="invalid"), steer(tiny_llama, DoLaContrast("logits", premature=[tiny_llama.n_layers])):
        pass
    with pytest.raises(ValueError, match="at least one"):
        DoLaContrast("logits", premature=[])


# ------------------------------------------------------------------ class-balanced contrasts (ITI, CAA)
def _unbalanced_questions(n_present: int = 100, n_absent: int = 200) -> list:
    """2:1 absent:present yes/no questions (as the organism's fit sets), one image id per question."""
    from haltrace.data import YesNoQuestion

    labels = ["yes"] * n_present + ["no"] * n_absent
    order = np.random.default_rng(0).permutation(len(labels))
    return [YesNoQuestion(f"is there a thing {i} ?", labels[j], image_id=i) for i, j in enumerate(order)]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_caa_balanced_contrast_cancels_the_answer_word(organism, monkeypatch):
    """Plant states = answer word along the yes-minus-no unembedding direction u + truthfulness along s (s is
    orthogonal to u). The pair differences are +2u+2s (present) and -2u+2s (absent): with 2:1 absent:present the
    plain mean leans to "no" (the old vector); the balanced one is 2s, orthogonal to u."""
    from haltrace.steering import caa
    from haltrace.steering.fitdata import answer_direction

    model, _world = organism
    u = _unit(answer_direction(model))
    s = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3))
    s = _unit(s - (s @ u) * u)
    questions = _unbalanced_questions()

    def fake_states(_model, items, hooks, *, append=None, **_kw):
        rows = []
        for q, answer in zip(items, append, strict=True):
            word = 1.0 if answer == "yes" else -1.0
            truthful = 1.0 if (answer == "yes") == q.present else -1.0
            rows.append(3.0 * word * u + truthful * s)
        return None, {hooks[0]: torch.stack(rows)}

    monkeypatch.setattr(caa, "question_states", fake_states)
    balanced = CAA().fit(model, questions, layer=1)
    old = CAA().fit(model, questions, layer=1, balance="none")
    prov = balanced.provenance
    assert prov["class_counts"] == {"yes": 100, "no": 200} and prov["balance"] == "classes"
    assert abs(prov["answer_direction_cosine"]) < 1e-3  # no net "say yes/no" push
    assert torch.allclose(balanced.interventions[0].vector, 2 * s, atol=1e-4)
    # the plain mean 2s - 2u: cosine -1/sqrt(2) with the answer direction
    assert prov["answer_direction_cosine_unbalanced"] == pytest.approx(-2 ** -0.5, abs=1e-3)
    assert old.provenance["answer_direction_cosine"] == pytest.approx(-2 ** -0.5, abs=1e-3)
    assert any("unbalanced" in d for d in old.provenance["deviations"])


def _fake_head_states(model, plant):
    """A question_states replacement returning head_out activations: zeros except what ``plant(q, answer)``
    puts in (a dict {(layer, head): vector})."""
    def fake(_model, items, hooks, *, append=None, **_kw):
        acts = {h: torch.zeros(len(items), model.n_heads, model.head_dim) for h in hooks}
        for i, (q, answer) in enumerate(zip(items, append, strict=True)):
            for (layer, head), vec in plant(i, q, answer).items():
                acts[f"head_out.{layer}"][i, head] = vec
        return None, acts
    return fake


def test_iti_balanced_direction_has_no_answer_word_component(organism, monkeypatch):
    """One head carries truthfulness t and the answer word a (its W_O image is the yes-minus-no unembedding
    direction's, t is orthogonal to that): the balanced mass mean is t alone, the unweighted one leans to "no"."""
    from haltrace.steering import iti
    from haltrace.steering.fitdata import answer_direction

    model, _world = organism  # 2 layers x 2 heads
    layer, head = 1, 1
    w_o = iti.o_proj_weight(model.adapter.o_proj(layer))[:, head * model.head_dim:(head + 1) * model.head_dim]
    a = _unit(w_o.detach().float().T @ answer_direction(model))  # head-space direction W_O maps onto u
    t = torch.randn(model.head_dim, generator=torch.Generator().manual_seed(5))
    t = _unit(t - (t @ a) * a)
    noise = torch.Generator().manual_seed(6)

    def plant(_i, q, answer):
        word = 1.0 if answer == "yes" else -1.0
        true = 1.0 if (answer == "yes") == q.present else -1.0
        return {(layer, head): 2.0 * word * a + true * t + 0.01 * torch.randn(model.head_dim, generator=noise)}

    monkeypatch.setattr(iti, "question_states", _fake_head_states(model, plant))
    questions = _unbalanced_questions()
    fitted = ITI().fit(model, questions, k=1)
    detail = fitted.provenance["heads"][f"head_out.{layer}[{head}]"]
    assert fitted.provenance["heads"].keys() == {f"head_out.{layer}[{head}]"}
    assert abs(detail["answer_direction_cosine"]) < 0.02
    assert detail["answer_direction_cosine_unbalanced"] < -0.4  # the old direction: 2t - (2/3) 2a
    old = ITI().fit(model, questions, k=1, balance="none")
    assert old.provenance["answer_direction_cosine"] < -0.4


def test_iti_balanced_ranking_ignores_a_head_that_only_reads_the_answer_word(organism, monkeypatch):
    """Head (0, 0) reads only the answer word; head (1, 1) weakly reads truthfulness. Unweighted, the answer-word
    head scores n_absent / n (2/3) and wins; class-weighted it scores 1/2 and the truthful head wins."""
    from haltrace.steering import iti

    model, _world = organism
    gen = torch.Generator().manual_seed(7)
    t = _unit(torch.randn(model.head_dim, generator=gen))
    word_dir = _unit(torch.randn(model.head_dim, generator=gen))

    def plant(_i, q, answer):
        word = 1.0 if answer == "yes" else -1.0
        true = 1.0 if (answer == "yes") == q.present else -1.0
        return {(0, 0): word * word_dir, (1, 1): 0.3 * true * t + torch.randn(model.head_dim, generator=gen)}

    monkeypatch.setattr(iti, "question_states", _fake_head_states(model, plant))
    questions = _unbalanced_questions(200, 400)
    balanced = ITI().fit(model, questions, k=1)
    old = ITI().fit(model, questions, k=1, balance="none")
    assert old.provenance["k"] == 1 and list(old.provenance["heads"]) == ["head_out.0[0]"]
    assert list(balanced.provenance["heads"]) == ["head_out.1[1]"]
    scores = np.array(balanced.provenance["val_accuracy_by_head"])
    assert scores[0, 0] == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------ presets
def test_iti_paper_preset(organism):
    from haltrace.errors import InputError
    from haltrace.steering.iti import paper_k

    assert paper_k(32 * 32) == 48 and paper_k(12 * 12) == 48 and paper_k(16) == 1
    model, world = organism
    items = fit_items(world, "iti", n_images=8)
    fitted = ITI().fit(model, items, preset="paper")
    prov = fitted.provenance
    assert prov["preset"] == "paper" and prov["k"] == 1 and prov["alpha"] == 15.0
    assert any(d.startswith("K=1 of 4 heads") for d in prov["deviations"])
    assert ITI().fit(model, items, preset="paper", alpha=4.0).provenance["alpha"] == 4.0
    assert any("alpha 4" in d for d in ITI().fit(model, items, alpha=4.0).provenance["deviations"])
    with pytest.raises(InputError, match="unknown ITI preset"):
        ITI().fit(model, items, preset="fast")
    with pytest.raises(InputError, match="balance"):
        ITI().fit(model, items, balance="half")


def test_caa_paper_preset(organism):
    from haltrace.errors import InputError

    model, world = organism
    items = fit_items(world, "caa", n_images=6)
    fitted = CAA().fit(model, items, preset="paper")
    prov = fitted.provenance
    assert prov["preset"] == "paper" and prov["multiplier"] == 1.0
    assert prov["layer"]["haltrace"] == f"resid_post.{default_layer(model.n_layers)}"
    assert "CAA's -1" in prov["sign"] and any("relative depth" in d for d in prov["deviations"])
    assert CAA().fit(model, items, preset="paper", multiplier=2.0).provenance["multiplier"] == 2.0
    with pytest.raises(InputError, match="unknown CAA preset"):
        CAA().fit(model, items, preset="fast")
    with pytest.raises(InputError, match="balance"):
        CAA().fit(model, items, balance="half")
