"""DoLa — Decoding by Contrasting Layers (Chuang et al., ICLR 2024, arXiv 2309.03883), as a decoding strategy.

transformers removed DoLa from the library in PR #40082 (merged August 2025, the 4.56 era): ``generate(dola_layers=...)``
now dispatches to the hub repo ``transformers-community/dola`` (``custom_generate`` + ``trust_remote_code``), which
is unusable offline. So DoLa
is implemented here as a hook on the model's forward that *replaces the output logits* with DoLa scores. That
one mechanism serves every consumer: a plain forward (POPE's first-token answers = argmax of the DoLa scores)
and ``generate()`` (greedy decoding over DoLa scores; logits processors run on them, as in HF's ``_dola_decoding``).

Per position (``shared/research/methods-llm-eval.md`` §4.3):

* mature distribution ``q_N`` = the model's own output (final norm applied);
* premature candidates ``q_j = softmax(lm_head(h[j]))`` for HF ``hidden_states`` indices ``j`` (0 = embeddings,
  ``j`` = ``resid_post.{j-1}``), **without** the final norm by default, as the original and HF code do
  (``final_norm=True`` is the "corrected" variant);
* premature layer ``M = argmax_j D(q_N, q_j)``; ``divergence="js_code"`` (default) is the code's
  ``0.5 * [KL(m||q_N) + KL(m||q_j)]`` averaged over the vocabulary, ``"jsd"`` the textbook JSD. Unlike HF, which
  averages over the batch, M is chosen per row (as the paper's batch-size-1 evaluation does);
* adaptive plausibility: ``V_head = {x: log q_N(x) >= max log q_N + log(relative_top)}`` (``relative_top=0.1``);
  score ``log q_N - log q_M`` on ``V_head`` (``-inf`` elsewhere; base filtered to ``-1e-3`` outside, as HF).

Candidate layers: ``"high"`` = HF's ``range(N//2, N, 2)`` (paper's bucket for open-ended generation), ``"low"`` =
``range(0 or 2, N//2, 2)`` (2 when embeddings are tied), or a list of ``hidden_states`` indices. The paper uses a
repetition penalty of 1.2 with DoLa; it is off by default here (``repetition_penalty=None``) because the
organism's captions legitimately repeat colour words, and the penalty would confound the contrast's effect.
``preset="paper"`` sets the published configuration: the ``high`` bucket and repetition penalty 1.2.

Fidelity (paper / official code step -> haltrace -> same or different):

==========================================  =====================  ===============================================
early exit ``lm_head(h_j)``, no final norm   ``DoLaContrast``       same (``final_norm=True``: corrected variant)
premature layer by the code's "JSD"          ``dola_scores``        same formula; chosen per row, HF averages the
                                                                    divergence over the batch (same at batch 1;
                                                                    parity test against HF's formula)
adaptive plausibility, relative_top 0.1      ``dola_scores``        same (base -1e-3, final -inf outside the head)
candidate buckets ``low`` / ``high``         ``candidate_layers``   same as HF's ``dola_layers``
repetition penalty 1.2                       ``RepetitionPenalty``  ``preset="paper"``; off by default (see above)
==========================================  =====================  ===============================================

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> from haltrace.evals.suite import evaluate
>>> model = haltrace.load("shapes-llava")                                  # doctest: +SKIP
>>> fitted = get_method("dola").fit(model, layers="high")                  # doctest: +SKIP
>>> evaluate(model, ["pope", "chair"], fitted=fitted)                     # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from haltrace.steering.interventions import Intervention, register_state_type
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = "Chuang et al., DoLa: Decoding by Contrasting Layers Improves Factuality in LLMs, ICLR 2024"
#: ``tfqa_eval.py`` sets 1.2 for DoLa decoding when none is given
PAPER_REPETITION_PENALTY = 1.2
DIVERGENCES = ("js_code", "jsd")


def candidate_layers(spec: str | Sequence[int], n_layers: int, tied_embeddings: bool = False) -> list[int]:
    """HF ``dola_layers`` semantics: ``hidden_states`` indices of the premature candidates.

    >>> candidate_layers("high", 32)[:3], candidate_layers("low", 4)
    ([16, 18, 20], [0])
    """
    if isinstance(spec, str):
        start = 2 if tied_embeddings else 0
        if spec == "low":
            layers = list(range(start, n_layers // 2, 2) if n_layers <= 40 else range(start, 20, 2))
        elif spec == "high":
            layers = list(range(n_layers // 2, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
        else:
            raise ValueError(f"layers must be 'low', 'high' or a list of hidden_states indices, got {spec!r}")
    else:
        layers = sorted({int(j) for j in spec})
    bad = [j for j in layers if not 0 <= j < n_layers]
    if bad or not layers:
        raise ValueError(f"premature layers {bad or '[]'} invalid: hidden_states indices 0..{n_layers - 1} "
                         f"(index {n_layers} is the mature layer itself)")
    return layers


def dola_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor, *, relative_top: float = 0.1,
                divergence: str = "js_code", base_filter_value: float = -1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa scores ``[..., V]`` from mature logits ``[..., V]`` and candidates ``[C, ..., V]``; also the chosen
    candidate index per position ``[...]``.

    >>> s, m = dola_scores(torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[[2.0, 0.0, 0.0]]]))
    >>> s[0, 2].item() == float("-inf"), m.tolist()
    (True, [0])
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 < relative_top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}")
    final_lp = F.log_softmax(final_logits.float(), dim=-1)
    cand_lp = F.log_softmax(premature_logits.float(), dim=-1)  # [C, ..., V]
    p, q = final_lp.exp().unsqueeze(0), cand_lp.exp()
    m = 0.5 * (p + q)
    log_m = m.clamp_min(1e-30).log()
    if divergence == "js_code":  # F.kl_div(log q, m) = KL(m||q), averaged over the vocabulary (as the code)
        div = 0.5 * ((m * (log_m - final_lp.unsqueeze(0))).mean(-1) + (m * (log_m - cand_lp)).mean(-1))
    else:
        div = 0.5 * ((p * (final_lp.unsqueeze(0) - log_m)).sum(-1) + (q * (cand_lp - log_m)).sum(-1))
    chosen = div.argmax(0)  # [...]
    base_lp = torch.gather(cand_lp, 0, chosen.unsqueeze(0).unsqueeze(-1).expand(1, *cand_lp.shape[1:])).squeeze(0)
    threshold = final_lp.max(-1, keepdim=True).values + math.log(relative_top)
    outside = final_lp < threshold  # the top token always stays inside
    base_lp = base_lp.masked_fill(outside, base_filter_value)
    scores = (final_lp - base_lp).masked_fill(outside, float("-inf"))
    return scores, chosen


@register_state_type
@dataclass
class DoLaContrast(Intervention):
    """At ``logits``: replaces the model's output logits with DoLa scores (:func:`dola_scores`) against the
    premature candidates ``premature`` (HF ``hidden_states`` indices: 0 = embeddings = ``resid_pre.0``, ``j`` =
    ``resid_post.{j-1}``), at every position the model returns. ``stats["premature"]`` counts how often each
    candidate was chosen (runtime only).

    >>> with steer(model, DoLaContrast("logits", premature=[2])):        # doctest: +SKIP
    ...     model.hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    """

    premature: list[int] = field(default_factory=list)
    relative_top: float = 0.1
    final_norm: bool = False
    divergence: str = "js_code"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.premature:
            raise ValueError("DoLa needs at least one premature layer")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        self.premature = [int(j) for j in self.premature]
        self.reset()

    def validate(self, model: Any) -> Any:
        bad = [j for j in self.premature if not 0 <= j < model.n_layers]
        if bad:
            raise ValueError(f"premature layers {bad} invalid for a model with {model.n_layers} layers")
        return super().validate(model)

    @staticmethod
    def site_of(j: int) -> str:
        return "resid_pre.0" if j == 0 else f"resid_post.{j - 1}"

    def reads(self, model: Any) -> tuple[str, ...]:
        return tuple(self.site_of(j) for j in self.premature)

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        adapter = ctx.model.adapter
        keep = x.shape[1]  # generate() may keep only the last position's logits
        with torch.no_grad():
            premature = []
            for j in self.premature:
                h = ctx.reads[self.site_of(j)][:, -keep:]
                premature.append(adapter.unembed(adapter.final_norm(h) if self.final_norm else h))
            scores, chosen = dola_scores(x, torch.stack(premature), relative_top=self.relative_top,
                                         divergence=self.divergence)
        self.stats["positions"] += int(chosen.numel())
        for idx, j in enumerate(self.premature):
            self.stats["premature"][j] += int((chosen == idx).sum())
        return scores.to(x.dtype)

    def reset(self) -> None:
        self.__dict__["stats"] = {"positions": 0, "premature": {j: 0 for j in self.premature}}


@register_state_type
@dataclass
class RepetitionPenalty(Intervention):
    """At ``logits``: Hugging Face's repetition penalty on the last position (``score / p`` where positive,
    ``score * p`` where negative, for every token id fed so far, prompt included, left padding excluded, as
    ``generate`` sets up ``RepetitionPenaltyLogitsProcessor`` with ``prompt_ignore_length``). As an engine edit it applies
    wherever the model runs (``generate`` and plain forwards alike) and needs no ``generate()`` argument."""

    penalty: float = 1.2
    uses_history = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.penalty) and self.penalty > 0):
            raise ValueError(f"repetition penalty must be a positive number, got {self.penalty}")
        self.penalty = float(self.penalty)

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        ids = ctx.history
        if ids is None:
            return x
        vocab = x.shape[-1]
        # padding (and ids beyond the head) go to one extra column that is dropped afterwards
        ids = ids.to(x.device).masked_fill(~ctx.history_mask.to(x.device), vocab).clamp(max=vocab)
        last = torch.nn.functional.pad(x[:, -1].float(), (0, 1))
        score = torch.gather(last, 1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        out = x.clone()
        out[:, -1] = last.scatter(1, ids, score)[:, :vocab].to(x.dtype)
        return out


def dola_interventions(layers: Sequence[int], *, relative_top: float = 0.1, final_norm: bool = False,
                       divergence: str = "js_code", repetition_penalty: float | None = None) -> list[Intervention]:
    """The contrast, then (when set) the repetition penalty on its scores, in HF's order."""
    items: list[Intervention] = [DoLaContrast("logits", premature=list(layers), relative_top=relative_top,
                                              final_norm=final_norm, divergence=divergence)]
    if repetition_penalty not in (None, 1.0):
        items.append(RepetitionPenalty("logits", penalty=float(repetition_penalty)))
    return items


@register_method
class DoLa(Method):
    """DoLa decoding: contrast the final layer's log-probs with a dynamically chosen premature layer's."""

    name = "dola"
    summary = "decoding strategy: log q_final - log q_premature on the plausible head (relative_top 0.1)"

    def fit(self, model: Any, data: Any = None, *, layers: str | Sequence[int] = "high", relative_top: float = 0.1,
            final_norm: bool = False, divergence: str = "js_code", repetition_penalty: float | None = None,
            preset: str | None = None, **kw: Any) -> FittedIntervention:
        """Nothing is learned: ``fit`` validates the settings and returns the decoding strategy (``data`` unused).

        ``preset="paper"``: the published configuration (``high`` bucket, repetition penalty 1.2) unless
        ``repetition_penalty`` is given explicitly.
        """
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if preset not in (None, "paper"):
            raise ValueError(f"unknown DoLa preset {preset!r}; the only preset is 'paper'")
        if preset == "paper" and repetition_penalty is None:
            repetition_penalty = PAPER_REPETITION_PENALTY
        if data is not None:
            raise ValueError("DoLa learns nothing from data; call fit(model, layers=...)")
        tied = bool(getattr(model.adapter.text_config, "tie_word_embeddings", False))
        cands = candidate_layers(layers, model.n_layers, tied)
        items = dola_interventions(cands, relative_top=relative_top, final_norm=final_norm, divergence=divergence,
                                   repetition_penalty=repetition_penalty)
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "premature_layers": {"hf_hidden_states": cands,
                                 "haltrace": ["resid_pre.0" if j == 0 else f"resid_post.{j - 1}" for j in cands],
                                 "spec": layers if isinstance(layers, str) else list(layers)},
            "mature_layer": {"hf_hidden_states": model.n_layers, "haltrace": "model output (final norm applied)"},
            "relative_top": relative_top, "final_norm_on_premature": final_norm, "divergence": divergence,
            "repetition_penalty": repetition_penalty, "preset": preset,
            "deviations": ([] if repetition_penalty == PAPER_REPETITION_PENALTY else
                           [f"repetition penalty {repetition_penalty} (paper: {PAPER_REPETITION_PENALTY})"]) +
                          ["premature layer chosen per row (HF: batch-averaged divergence)"],
            "implementation": ("engine edit at the logits site replacing the output logits (HF 5.x moved DoLa to "
                               "a hub repo needing trust_remote_code); premature layer chosen per row; the "
                               "repetition penalty as an engine edit on the DoLa scores (HF's order)"),
            "positions": "every position whose logits the model returns", "phase": "both",
            "data": {"description": "none (decoding strategy)"},
            "fingerprint": f"dola-{'-'.join(map(str, cands))}-{relative_top}-{int(final_norm)}-{divergence}",
        }
        return FittedIntervention(self.name, items, provenance)
