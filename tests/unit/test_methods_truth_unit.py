"""Unit tests for TruthPrInt, VHR, ITI, CAA and DoLa on tiny random models (plumbing, not claims)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from haltrace.organism.fit_data import fit_items, yesno_questions
from haltrace.steering.caa import caa_interventions, default_layer
from haltrace.steering.dola import DoLaDecoder, candidate_layers, dola_scores
from haltrace.steering.engine import steer
from haltrace.steering.iti import head_interventions, head_shift_vector
from haltrace.steering.registry import get_method, list_methods
from haltrace.steering.truthprint import TruthfulGate
from haltrace.steering.vhr import default_layers, select_heads


def _n_hooks(model) -> int:
    mods = [model.hf, *model.adapter.layers, *(model.adapter.o_proj(i) for i in range(model.n_layers))]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def _gate(model, *, threshold: float, alpha: float = 5.0, layer: int = 0) -> TruthfulGate:
    d = model.hidden_size
    g = torch.Generator().manual_seed(0)
    return TruthfulGate(layer, torch.zeros(d), torch.ones(d), torch.randn(d, generator=g), 0.0,
                        torch.randn(d, generator=g), alpha=alpha, threshold=threshold)


@pytest.fixture(scope="module")
def organism():
    """A random-weight ShapesWorld organism (real architecture and tokenizer, untrained)."""
    from transformers import LlavaForConditionalGeneration

    from haltrace.models import Model
    from haltrace.organism.processing import build_processor
    from haltrace.organism.train import PRESETS, build_model_config
    from haltrace.organism.world import ShapesWorld

    world = ShapesWorld()
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(build_model_config(world, PRESETS["tiny"]))
    return Model.from_hf(hf, build_processor(world), name="random-organism"), world


def test_registered():
    assert {"truthprint", "vhr", "iti", "caa", "dola"} <= set(list_methods())


# ------------------------------------------------------------------ TruthPrInt gate
def test_gate_validation(tiny_llama):
    d = tiny_llama.hidden_size
    with pytest.raises(ValueError, match="len\\(layers\\) \\* direction width"):
        TruthfulGate(0, torch.zeros(d), torch.ones(d), torch.zeros(d + 1), 0.0, torch.zeros(d), alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="increasing"):
        TruthfulGate([1, 0], torch.zeros(2 * d), torch.ones(2 * d), torch.zeros(2 * d), 0.0, torch.zeros(d),
                     alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="probability"):
        TruthfulGate(0, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d), alpha=1, threshold=2)
    with pytest.raises(ValueError, match="NaN"):
        TruthfulGate(0, torch.full((d,), math.nan), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d),
                     alpha=1, threshold=.5)
    with pytest.raises(ValueError, match="out of range"), TruthfulGate(
            9, torch.zeros(d), torch.ones(d), torch.zeros(d), 0.0, torch.zeros(d), alpha=1, threshold=.5)(tiny_llama):
        pass


def test_gate_edits_only_the_producing_position(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        base = tiny_llama.hf(**inputs).logits
        gate = _gate(tiny_llama, threshold=0.0)  # p > 0 always: fires everywhere it looks
        with gate(tiny_llama):
            steered = tiny_llama.hf(**inputs).logits
    assert gate.stats == {"steps": 2, "fired": 2}
    real = inputs["attention_mask"][:, :-1].bool()  # pad rows attend everywhere (fully masked): skip them
    assert torch.allclose(base[:, :-1][real], steered[:, :-1][real], atol=1e-5)  # left padding: last is produced
    assert not torch.allclose(base[:, -1], steered[:, -1])
    with torch.no_grad(), _gate(tiny_llama, threshold=1.0)(tiny_llama):  # never fires: identity
        assert torch.allclose(base, tiny_llama.hf(**inputs).logits)


def test_multi_layer_gate_reads_every_block(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    d = tiny_llama.hidden_size
    weight = torch.zeros(2 * d)
    weight[0] = 1.0  # only block 0's first feature decides
    gate = TruthfulGate([0, 1], torch.zeros(2 * d), torch.ones(2 * d), weight, 0.0, torch.ones(d), alpha=3.0,
                        threshold=0.5)
    with torch.no_grad():
        h0 = tiny_llama.capture(inputs, ["resid_post.0"], positions="last")["resid_post.0"][:, 0, 0]
        with gate(tiny_llama):
            tiny_llama.hf(**inputs)
    assert gate.layer == 1 and gate.stats["fired"] == int((h0 > 0).sum())


def test_gate_under_generation_and_removal(tiny_llava, tiny_inputs):
    inputs = tiny_inputs("llava")
    before = _n_hooks(tiny_llava)
    gate = _gate(tiny_llava, threshold=0.0, layer=1)
    with torch.no_grad(), gate(tiny_llava):
        out = tiny_llava.hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert gate.stats["steps"] == 2 * 3 and gate.stats["fired"] == 6  # prefill + 2 cached steps, 2 rows
    assert _n_hooks(tiny_llava) == before
    with pytest.raises(RuntimeError, match="boom"), gate(tiny_llava):
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
    fitted = get_method("vhr").fit(model, fit_items(world, "vhr", n_images=4))
    assert fitted.method == "vhr" and fitted.interventions
    for item in fitted.interventions:
        assert item.hook.startswith("head_out.") and item.factor == 2.0 and len(item.heads) >= 1
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
    decoder = fitted.hooks
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
    with pytest.raises(ValueError, match="invalid"), DoLaDecoder([tiny_llama.n_layers])(tiny_llama):
        pass
    with pytest.raises(ValueError, match="at least one"):
        DoLaDecoder([])
