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
    assert fitted.generate_kwargs == {"repetition_penalty": 1.2}
    assert fitted.provenance["preset"] == "paper" and fitted.provenance["deviations"][-1].startswith("premature")
    with pytest.raises(ValueError, match="preset"):
        get_method("dola").fit(model, preset="fast")
