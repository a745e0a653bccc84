"""DoLa's scores equal Hugging Face's DoLa formula (``_dola_select_contrast`` + ``_relative_top_filter``, removed
from transformers in PR #40082), recomputed here independently from ``output_hidden_states``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from haltrace.models import Model
from haltrace.models.tiny import build_tiny, build_tiny_inputs
from haltrace.steering.registry import get_method


def _hf_dola(final_logits: torch.Tensor, premature: list[torch.Tensor], relative_top: float = 0.1) -> torch.Tensor:
    """HF's computation for one decoding position: [B, V] mature logits, candidates [B, V] each."""
    mature = F.softmax(final_logits, dim=-1)
    js = []
    for logits in premature:
        prem = F.softmax(logits, dim=-1)
        m = 0.5 * (mature + prem)
        kl1 = F.kl_div(F.log_softmax(final_logits, dim=-1), m, reduction="none").mean(-1)
        kl2 = F.kl_div(F.log_softmax(logits, dim=-1), m, reduction="none").mean(-1)
        js.append((0.5 * (kl1 + kl2)).mean(-1))  # HF averages over the batch
    base = premature[int(torch.stack(js).argmax())]
    scores, baseline = F.log_softmax(final_logits, dim=-1), F.log_softmax(base, dim=-1)
    sorted_logits = torch.sort(scores, descending=True).values
    min_thresh = sorted_logits[..., 0]
    thresh = scores.max(-1).values + math.log(relative_top)
    thresh = torch.min(min_thresh, thresh).unsqueeze(-1)
    baseline = baseline.masked_fill(scores < thresh, -1e-3)
    scores = scores.masked_fill(scores < thresh, float("-inf"))
    return scores - baseline


@pytest.mark.parametrize("layers", ["high", "low", [0, 1]])
def test_dola_matches_hf_formula(layers):
    hf, tok = build_tiny("llama")
    model = Model.from_hf(hf, tok, name="tiny-llama")
    inputs = build_tiny_inputs("llama", tok, n=1)
    with torch.no_grad():
        out = model.hf(**inputs, output_hidden_states=True)
        fitted = get_method("dola").fit(model, layers=layers)
        with fitted.apply(model):
            ours = model.hf(**inputs).logits[0, -1]
    cands = fitted.provenance["premature_layers"]["hf_hidden_states"]
    head = model.adapter.unembed
    premature = [head(out.hidden_states[j])[:, -1].float() for j in cands]  # no final norm, as HF and the paper
    ref = _hf_dola(out.logits[:, -1].float(), premature)[0]
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours))
    assert float((ours[finite] - ref[finite]).abs().max()) <= 1e-5


def test_dola_paper_preset_sets_the_published_penalty():
    hf, tok = build_tiny("llama")
    model = Model.from_hf(hf, tok, name="tiny-llama")
    fitted = get_method("dola").fit(model, preset="paper")
    assert fitted.generate_kwargs == {}  # the penalty is an engine edit: steer(model, fitted) installs it whole
    assert [type(i).__name__ for i in fitted.interventions] == ["DoLaContrast", "RepetitionPenalty"]
    assert fitted.interventions[1].penalty == 1.2
    assert fitted.provenance["preset"] == "paper" and fitted.provenance["deviations"][-1].startswith("premature")
    with pytest.raises(ValueError, match="preset"):
        get_method("dola").fit(model, preset="fast")


def test_engine_repetition_penalty_equals_hf_generate_argument():
    """DoLa + the engine's RepetitionPenalty decodes exactly as DoLa + generate(repetition_penalty=1.2)."""
    hf, tok = build_tiny("llama")
    model = Model.from_hf(hf, tok, name="tiny-llama")
    inputs = build_tiny_inputs("llama", tok, n=2)
    assert not bool(inputs["attention_mask"].all())  # one row is left-padded: HF does not penalise its padding
    paper = get_method("dola").fit(model, preset="paper")
    plain = get_method("dola").fit(model, layers="high")
    with torch.no_grad():
        with paper.apply(model):
            ours = model.hf.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
        with plain.apply(model):
            ref = model.hf.generate(**inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.2,
                                    output_scores=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)) and torch.allclose(a[finite], b[finite], atol=1e-5)
