"""PvP — Pixels versus Priors (Golovanevsky, Rudman et al., arXiv 2505.17127, EMNLP 2025).

A steering vector from the *same counterfactual image* under two prompts: ``"what colour is the X"`` (the
visual question) and ``"what colour are most X"`` (the world-knowledge question). Per layer,
``v_L = mean_n(h_L^this(n) - h_L^most(n))`` at the last prompt token; adding ``+alpha * v_L`` at the last
prompt position steers answers towards the pixels, ``-alpha * v_L`` towards the prior.

Layer convention (``haltrace.conventions``): the vector is read at ``resid_post.L`` (output of block ``L`` ==
HF ``hidden_states[L+1]``) and added to the same point, ``resid_post.L``. The official code builds the vector
from ``hidden_states[l]`` but adds it to the output of ``layers[l]`` (== ``hidden_states[l+1]``): an
off-by-one we do not copy (methods-vlm.md §1 pitfall 1). In the paper's capture index our layer ``L`` is
``hidden_states[L+1]``; in its injection index (``--target_layers``) it is ``L``.

Layer and strength are chosen by the data: the fit items are split in two halves, a vector is built on one
half for every layer and every ``alpha`` in a grid, and the other half is answered under steering; the
``(layer, alpha)`` with the best held-out target rate (plus ordinary colour accuracy, for steering towards
pixels) wins, ties going to the smaller ``alpha`` and the earlier layer. The final vector is the mean over all
fit items. The paper adds with scale 1 and no selection rule (its layers come from the CLI).

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                                     # doctest: +SKIP
>>> fitted = get_method("pvp").fit(model, direction="pixels")                   # doctest: +SKIP
>>> fitted.provenance["layers"]                                                 # doctest: +SKIP
{'haltrace': 'resid_post.2', ...}

The helpers it shares with the other VLM methods (last-token states without padding, answers under steering,
layer records) live in :mod:`haltrace.steering.fitdata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.items import PvPItem, VQAQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.steering.engine import Add
from haltrace.steering.fitdata import (
    item_prompts,
    items_fingerprint,
    last_token_states,
    layer_record,
    next_words,
    require_vlm,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method

__all__ = ["PvP", "PvPItem", "last_token_states", "next_words", "normalise_answer"]

PAPER = ("Golovanevsky, Rudman et al., 'Pixels Versus Priors: Controlling Knowledge Priors in Vision-Language "
         "Models through Visual Counterfacts', arXiv 2505.17127 (EMNLP 2025); code rsinghlab/pixels_vs_priors@52d8ae0")
#: seed of the default fit data an organism's data source draws (the held-out eval sets use their own seeds)
FIT_SEED = 12345


# --------------------------------------------------------------------------------------- the method

def normalise_answer(text: str) -> str:
    """Lower-cased first word without punctuation ("Red." -> "red"): how a one-word answer is compared."""
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
    return words[0] if words else ""


def _rate(answers: Sequence[str], targets: Sequence[str]) -> float:
    return (float(np.mean([normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, targets,
                                                                                      strict=True)]))
            if targets else 0.0)


@register_method
class PvP(Method):
    """Pixels-vs-priors steering: ``±alpha * mean(h_this - h_most)`` at the last prompt token of one layer.

    >>> fitted = PvP().fit(model, direction="priors")                  # doctest: +SKIP
    >>> with fitted.apply(model):                                       # doctest: +SKIP
    ...     model.hf(**inputs)
    """

    name = "pvp"
    summary = "Pixels vs priors: mean(this - most) difference at the last prompt token, +/- towards pixels/priors"

    def fit(self, model: Any, data: Sequence[Any] | None = None, *, direction: str = "pixels",
            layer: int | None = None, alpha: float | None = None, alphas: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
            steer_generated: bool = True, n_items: int = 64, seed: int = FIT_SEED,
            template: str | None = None) -> FittedIntervention:
        """Build the vector from ``data`` and choose the layer and ``alpha`` on a held-out half unless given.

        ``data``: :class:`~haltrace.data.PvPItem` items (a counterfactual image, its "this" and "most" questions,
        prior and pixel answers), plus optional :class:`~haltrace.data.VQAQuestion` colour questions on ordinary
        objects (the control that steering towards pixels must not break). Default: the model's data source
        (an organism's ``n_items`` counterfactual images drawn with ``seed``). Questions are plain; prompts come
        from the model's chat template or ``template``.

        ``steer_generated=True`` also adds the vector to every generated token, as the official code does
        (it wraps the layer and adds at the last position of every forward); one-word answers are unaffected.
        """
        if direction not in ("pixels", "priors"):
            raise ValueError(f"direction must be 'pixels' or 'priors', got {direction!r}")
        require_vlm(model, "PvP (pvp)", "it contrasts two questions about the same image")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_items, seed=seed)
        all_items = list(data)
        data = of_kind(all_items, PvPItem, method=self.name)
        control_items = [q for q in all_items if isinstance(q, VQAQuestion)]
        control = [(p, q.image, q.answer) for p, q in zip(
            item_prompts(model, [q.question for q in control_items], [q.image for q in control_items],
                         template=template), control_items, strict=True)]
        described = (f"{len(data)} PvP items, {len(control)} colour-control questions ("
                     f"{'given' if source is not None else 'the model data source default'})")
        if len(data) < 2:
            raise ValueError(f"PvP needs at least 2 items, got {len(data)}")
        if layer is not None and not -model.n_layers <= layer < model.n_layers:
            raise ValueError(f"layer {layer} out of range; this model has layers 0..{model.n_layers - 1}")
        images = [d.image for d in data]
        this_prompts = item_prompts(model, [d.this_question for d in data], images, template=template)
        most_prompts = item_prompts(model, [d.most_question for d in data], images, template=template)
        this = last_token_states(model, this_prompts, images)
        most = last_token_states(model, most_prompts, images)
        diffs = this - most  # [N, L, d]
        sign = 1.0 if direction == "pixels" else -1.0

        selection: list[dict] = []
        layers = [layer % model.n_layers] if layer is not None else list(range(model.n_layers))
        grid = [float(alpha)] if alpha is not None else [float(a) for a in alphas]
        labelled = all(d.prior and d.pixel for d in data)
        if len(layers) * len(grid) > 1:
            if not labelled:
                raise ValueError("choosing the layer/alpha needs items with prior and pixel answers; pass "
                                 "layer= and alpha= for unlabelled data")
            selection = self._select(model, data, this_prompts, diffs, layers, grid, sign, direction, control)
            best = max(selection, key=lambda r: (round(r["score"], 6), -r["alpha"], -r["layer"]))
            chosen_layer, chosen_alpha = best["layer"], best["alpha"]
        else:
            chosen_layer, chosen_alpha = layers[0], grid[0]

        vector = diffs[:, chosen_layer].mean(0)
        hook = f"resid_post.{chosen_layer}"
        interventions = [Add(hook, vector, alpha=sign * chosen_alpha, positions="last", phase="prompt")]
        if steer_generated:
            interventions.append(Add(hook, vector, alpha=sign * chosen_alpha, positions="all", phase="generation"))
        provenance = {
            "method": self.name, "paper": PAPER, "direction": direction,
            "layers": layer_record(hook, f"capture hidden_states[{chosen_layer + 1}], inject --target_layers "
                                         f"{chosen_layer} (official code: capture hidden_states[l], inject layers[l])"),
            "alpha": sign * chosen_alpha, "alpha_grid": grid, "vector_norm": float(vector.norm()),
            "vector_norm_by_layer": [float(v) for v in diffs.mean(0).norm(dim=-1)],
            "positions": "last prompt token" + (" + every generated token" if steer_generated else ""),
            "phase": "prompt" + ("+generation" if steer_generated else ""),
            "selection": selection, "selection_rule": "max held-out target rate (+ colour-control accuracy "
                                                      "for pixels) on a 50/50 split of the fit items; ties: "
                                                      "smaller alpha, earlier layer",
            "data": {"description": described, "n": len(data), "n_control": len(control),
                     "fingerprint": items_fingerprint(all_items)},
        }
        return FittedIntervention(self.name, interventions, provenance)

    @staticmethod
    def _select(model: Any, data: list[PvPItem], this_prompts: list[str], diffs: torch.Tensor, layers: list[int],
                grid: list[float], sign: float, direction: str, control: Sequence[tuple[str, Any, str]] | None
                ) -> list[dict]:
        """Held-out target rate for every (layer, alpha): vector from half A, answers on half B."""
        n = len(data)
        half_a = list(range(0, n, 2))
        half_b = list(range(1, n, 2))
        prompts = [this_prompts[i] for i in half_b]
        images = [data[i].image for i in half_b]
        targets = [data[i].pixel if direction == "pixels" else data[i].prior for i in half_b]
        use_control = bool(control) and direction == "pixels"
        rows = []
        for layer in layers:
            vec = diffs[half_a, layer].mean(0)
            for a in grid:
                add = [Add(f"resid_post.{layer}", vec, alpha=sign * a, positions="last", phase="prompt")]
                rate = _rate(next_words(model, prompts, images, interventions=add), targets)
                row = {"layer": layer, "alpha": a, "target_rate": rate, "score": rate}
                if use_control:
                    acc = _rate(next_words(model, [c[0] for c in control], [c[1] for c in control],
                                           interventions=add), [c[2] for c in control])
                    row["control_accuracy"] = acc
                    row["score"] = rate + acc
                rows.append(row)
        return rows
