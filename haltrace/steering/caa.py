"""CAA — Contrastive Activation Addition (Rimsky et al., ACL 2024; ``nrimsky/CAA``).

Recipe (``shared/research/methods-llm-eval.md`` §2.4), transposed to the organism:

* Pairs: each fit yes/no question twice, once with the truthful answer and once with the hallucinating one
  ("is there a knife ? answer : no" vs "... yes" when the knife is absent; the reverse when it is present).
  Present and absent objects are both used, so the pair difference is "truthful minus untruthful answer",
  not "no minus yes" (which would only lower recall).
* Activation: ``resid_post.L`` at the answer word (CAA reads the answer letter at position -2 because of a
  closing parenthesis; our answer word is the last token).
* Vector: ``v = mean(a_truthful - a_hallucinated)``, not normalised (as ``generate_vectors.py``).
* Steering: ``x <- x + multiplier * v`` at ``resid_post.L`` on every position from the end of the instruction on:
  the last prompt token (which produces the first answer token; CAA issue #3 is exactly this off-by-one) and
  every generated token. Paper multipliers are +-1.
* Layer: CAA steers Llama-2-7B at layer 13 of 32 (``model.layers[13]`` output = ``resid_post.13``); we keep the
  relative depth, ``resid_post.round(13/32 * N)`` = ``resid_post.2`` on the 4-layer organism.

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                    # doctest: +SKIP
>>> fitted = get_method("caa").fit(model, multiplier=1.0)    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from haltrace.data.items import YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.steering.engine import Add
from haltrace.steering.fitdata import fingerprint, items_fingerprint, question_states
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.steering.truthprint import FIT_SEED

PAPER = "Rimsky et al., Steering Llama 2 via Contrastive Activation Addition, ACL 2024"


def default_layer(n_layers: int) -> int:
    """CAA's layer 13 of 32 at the same relative depth."""
    return min(n_layers - 1, round(13 / 32 * n_layers))


def caa_interventions(hook: str, vector: torch.Tensor, multiplier: float) -> list[Add]:
    """CAA's positions: the last prompt token plus every generated token."""
    return [Add(hook, vector, alpha=multiplier, positions="last", phase="prompt"),
            Add(hook, vector, alpha=multiplier, positions="all", phase="generation")]


@register_method
class CAA(Method):
    """Contrastive activation addition of a truthful-minus-hallucinated answer vector."""

    name = "caa"
    summary = "mean(truthful answer - hallucinated answer) at resid_post, added from the instruction end on"

    def fit(self, model: Any, data: Sequence[YesNoQuestion] | None = None, *, n_images: int = 300,
            seed: int = FIT_SEED, layer: int | None = None, multiplier: float = 1.0, **kw: Any
            ) -> FittedIntervention:
        """Build the vector from yes/no questions (:class:`~haltrace.data.YesNoQuestion`; default: the model's
        data source, e.g. an organism's fresh questions)."""
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        layer = default_layer(model.n_layers) if layer is None else int(layer)
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has layers 0..{model.n_layers - 1}")
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
        vector = diff.mean(0)
        # how consistently the pairs agree with the mean direction (a sanity number, not a selection)
        agree = float(((diff @ vector) > 0).float().mean())
        spec = {"layer": layer, "multiplier": multiplier, "seed": seed, "n": len(questions)}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "layer": {"haltrace": hook, "hf_hidden_states_index": layer + 1,
                      "paper": "layer 13 of 32 (Llama-2-7B-chat), kept at relative depth round(13/32*N)"},
            "multiplier": multiplier, "vector_norm": float(vector.norm()), "pair_agreement": agree,
            "positions": "last prompt token (prompt phase) + every generated token (generation phase)",
            "phase": "both",
            "data": {"description": "fit yes/no questions, each paired truthful vs hallucinated answer "
                                    "(present and absent objects, incl. absent partners)",
                     "n_pairs": len(questions), "n_absent": sum(not q.present for q in questions),
                     "seed": seed, "fingerprint": items_fingerprint(questions),
                     "source": "given" if source is not None else "default (model's data source)"},
            "fingerprint": fingerprint(vector, spec=spec),
        }
        return FittedIntervention(self.name, caa_interventions(hook, vector, multiplier), provenance)
