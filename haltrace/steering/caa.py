"""CAA — Contrastive Activation Addition (Rimsky et al., ACL 2024; ``nrimsky/CAA``).

Recipe (``shared/research/methods-llm-eval.md`` §2.4), transposed to yes/no questions about images:

* Pairs: each fit yes/no question twice, once with the truthful answer and once with the hallucinating one
  ("is there a knife ? answer : no" vs "... yes" when the knife is absent; the reverse when it is present).
  Present and absent objects are both used, so the pair difference is "truthful minus untruthful answer",
  not "no minus yes" (which would only lower recall).
* Class balance: the fit sets ask about more absent than present objects (about 2:1 on the organism), and
  the answer word is the contrast token, so a plain mean of the pair differences carries a net "say no" push
  of ``(n_absent - n_present) / n`` times the answer-word difference. CAA's own hallucination data is balanced
  (one fiction and one truth question per row, the answer letters A/B in random order), so its vector has no
  net answer-letter component. Here the same balance comes from weighting: ``v`` is the average of the
  present-question mean and the absent-question mean (``balance="classes"``, the default; ``"none"`` is the
  plain mean). A/B letters are not an option for the organism, whose vocabulary holds no letters.
* Activation: ``resid_post.L`` at the answer word (CAA reads the answer letter at position -2 because of a
  closing parenthesis; our answer word is the last token).
* Vector: the (balanced) mean of ``a_truthful - a_hallucinated``, not normalised (as ``generate_vectors.py``).
  Its cosine with the answer-token direction (unembedding row "yes" minus "no") is logged in the provenance,
  beside the plain mean's, so a residual "say yes/no" component is visible.
* Steering: ``x <- x + multiplier * v`` at ``resid_post.L`` on every position from the end of the instruction on:
  the last prompt token (which produces the first answer token; CAA issue #3 is exactly this off-by-one) and
  every generated token. Paper multipliers are +-1.
* Layer: CAA steers Llama-2-7B at layer 13 of 32 (``model.layers[13]`` output = ``resid_post.13``; 13B: 14 of
  40); we keep the 7B's relative depth, ``resid_post.round(13/32 * N)`` = ``resid_post.2`` on the 4-layer organism.
* Sign: CAA's hallucination vector is "matching behaviour" (hallucinating) minus not; ours is truthful minus
  hallucinated, so our ``multiplier=+1`` is CAA's ``-1``.

``preset="paper"``: the published settings (layer at 13/32 depth, multiplier +1 = CAA's -1 on its hallucination
vector, class-balanced contrast), unless given explicitly; every remaining difference from the paper is listed
in ``provenance["deviations"]``.

Fidelity (paper / official code step -> haltrace -> same or different):

===============================================  ======================  ==========================================
A/B items, matching vs not-matching answer        ``fit``                 different: yes/no answers to image
                                                                          questions (truthful vs hallucinating)
balanced data (1 fiction + 1 truth question per   ``fit(balance=...)``    same balance, by class weights (the
row, random A/B letter order)                                             organism has no A/B letters)
activation at the answer token, block L output    ``question_states``     same (answer word is the last token)
``v = mean(pos - neg)``, unnormalised             ``fit``                 same (balanced mean); no rescaling to the
                                                                          mean norm over 7 behaviours (one here)
add ``m * v`` from the instruction end on         ``caa_interventions``   same when the prompt ends at the
                                                                          instruction (organism prompts do)
layer 13 of 32, multipliers +-1                   ``fit(preset=paper)``   same relative depth; sign flipped (above)
===============================================  ======================  ==========================================

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                    # doctest: +SKIP
>>> fitted = get_method("caa").fit(model, preset="paper")    # doctest: +SKIP
>>> fitted.provenance["answer_direction_cosine"]             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from haltrace.data.items import YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.errors import InputError
from haltrace.steering.engine import Add
from haltrace.steering.fitdata import (
    TRUTHPRINT_FIT_SEED,
    answer_direction,
    class_weights,
    cosine,
    fingerprint,
    items_fingerprint,
    question_states,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = "Rimsky et al., Steering Llama 2 via Contrastive Activation Addition, ACL 2024"
PRESETS = ("paper",)
BALANCES = ("classes", "none")
#: the paper's multiplier for "less hallucination" on its vector is -1; ours points the other way (see above)
PAPER_MULTIPLIER = 1.0


def default_layer(n_layers: int) -> int:
    """CAA's layer 13 of 32 at the same relative depth."""
    return min(n_layers - 1, round(13 / 32 * n_layers))


def caa_interventions(hook: str, vector: torch.Tensor, multiplier: float) -> list[Add]:
    """CAA's positions: the last prompt token plus every generated token."""
    return [Add(hook, vector, alpha=multiplier, positions="last", phase="prompt"),
            Add(hook, vector, alpha=multiplier, positions="all", phase="generation")]


def contrast_vector(diff: torch.Tensor, classes: Sequence[Any], balance: str = "classes") -> torch.Tensor:
    """Mean of the pair differences ``diff`` [N, d]: plain (``balance="none"``), or with every class (the
    truthful answer, "yes" / "no") weighted equally (``"classes"``: the average of the per-class means).

    >>> d = torch.tensor([[1.0], [1.0], [4.0]])
    >>> contrast_vector(d, ["no", "no", "yes"]).item(), contrast_vector(d, ["no", "no", "yes"], "none").item()
    (2.5, 2.0)
    """
    if balance not in BALANCES:
        raise InputError(f"balance must be one of {BALANCES}, got {balance!r}")
    if len(classes) != len(diff):
        raise ValueError(f"{len(diff)} differences but {len(classes)} class labels")
    if balance == "none":
        return diff.mean(0)
    weights = torch.from_numpy(class_weights(classes)).to(diff.dtype)
    return (weights[:, None] * diff).sum(0)


@register_method
class CAA(Method):
    """Contrastive activation addition of a truthful-minus-hallucinated answer vector."""

    name = "caa"
    summary = ("class-balanced mean(truthful answer - hallucinated answer) at resid_post, added from the "
               "instruction end on")

    def fit(self, model: Any, data: Sequence[YesNoQuestion] | None = None, *, n_images: int = 300,
            seed: int = TRUTHPRINT_FIT_SEED, layer: int | None = None, multiplier: float | None = None,
            balance: str | None = None, preset: str | None = None, **kw: Any) -> FittedIntervention:
        """Build the vector from yes/no questions (:class:`~haltrace.data.YesNoQuestion`; default: the model's
        data source, e.g. an organism's fresh questions).

        ``balance``: ``"classes"`` (default) weights present- and absent-object questions equally; ``"none"`` is
        the plain mean. ``preset="paper"``: the paper's layer (13/32 depth) and multiplier (+1 here = CAA's -1),
        class-balanced, unless given explicitly.
        """
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown CAA preset {preset!r}; the only preset is 'paper'")
        balance = "classes" if balance is None else balance
        if balance not in BALANCES:
            raise InputError(f"balance must be one of {BALANCES}, got {balance!r}")
        paper_layer = default_layer(model.n_layers)
        layer = paper_layer if layer is None else int(layer)
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has layers 0..{model.n_layers - 1}")
        multiplier = PAPER_MULTIPLIER if multiplier is None else float(multiplier)
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        questions = of_kind(data, YesNoQuestion, method=self.name)
        truthful = ["yes" if q.present else "no" for q in questions]
        untruthful = ["no" if a == "yes" else "yes" for a in truthful]
        hook = f"resid_post.{layer}"
        _, pos = question_states(model, questions, [hook], append=truthful)
        _, neg = question_states(model, questions, [hook], append=untruthful)
        diff = pos[hook] - neg[hook]
        vector = contrast_vector(diff, truthful, balance)
        plain = diff.mean(0)
        answer_dir = answer_direction(model)
        counts = {c: truthful.count(c) for c in ("yes", "no")}
        # how consistently the pairs agree with the mean direction (a sanity number, not a selection)
        agree = float(((diff @ vector) > 0).float().mean())
        deviations = self._deviations(model, layer, paper_layer, multiplier, balance, counts)
        spec = {"layer": layer, "multiplier": multiplier, "seed": seed, "n": len(questions), "balance": balance}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "preset": preset,
            "deviations": deviations,
            "layer": {"haltrace": hook, "hf_hidden_states_index": layer + 1,
                      "paper": "layer 13 of 32 (Llama-2-7B-chat), kept at relative depth round(13/32*N)"},
            "multiplier": multiplier,
            "sign": "+ = truthful minus hallucinated answer; CAA's hallucination vector is hallucinating minus "
                    "not, so multiplier +1 here is CAA's -1",
            "vector_norm": float(vector.norm()), "vector_norm_unbalanced": float(plain.norm()),
            "pair_agreement": agree,
            "balance": balance, "class_counts": counts,
            "answer_direction": "unembedding row 'yes' minus 'no' (mean over the tokenizer's first-token forms)",
            "answer_direction_cosine": cosine(vector, answer_dir),
            "answer_direction_cosine_unbalanced": cosine(plain, answer_dir),
            "positions": "last prompt token (prompt phase) + every generated token (generation phase)",
            "phase": "both",
            "data": {"description": "fit yes/no questions, each paired truthful vs hallucinated answer "
                                    "(present and absent objects, incl. absent partners)",
                     "n_pairs": len(questions), "n_absent": counts["no"],
                     "seed": seed, "fingerprint": items_fingerprint(questions),
                     "source": "given" if source is not None else "default (model's data source)"},
            "fingerprint": fingerprint(vector, spec=spec),
        }
        return FittedIntervention(self.name, caa_interventions(hook, vector, multiplier), provenance)

    @staticmethod
    def _deviations(model: Any, layer: int, paper_layer: int, multiplier: float, balance: str,
                    counts: dict[str, int]) -> list[str]:
        out = ["pairs are yes/no answers to image questions, the answer word last (paper: A/B multiple choice, "
               "the answer letter at position -2)",
               "no rescaling to the mean vector norm over the paper's 7 behaviours (one behaviour here)"]
        if model.n_layers != 32:
            out.append(f"layer {paper_layer} of {model.n_layers} = the paper's 13 of 32 at the same relative depth")
        if layer != paper_layer:
            out.append(f"layer {layer} (paper depth: {paper_layer} of {model.n_layers})")
        if abs(multiplier) != 1.0:
            out.append(f"multiplier {multiplier:g} (paper: +-1)")
        if balance == "none":
            out.append(f"unbalanced contrast ({counts['no']} absent : {counts['yes']} present questions): the "
                       "vector carries a net answer-word push (paper: balanced data, random A/B letters)")
        elif min(counts.values()) == 0:
            out.append("only one answer class in the fit data: balancing cannot cancel the answer word")
        return out
