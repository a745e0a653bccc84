"""PvP — Pixels versus Priors (Golovanevsky, Rudman et al., arXiv 2505.17127, EMNLP 2025).

A steering vector from the *same counterfactual image* under two prompts: ``"what colour is the X"`` (the
visual question, "this") and ``"what colour are most X"`` (the world-knowledge question, "most"). Per layer,
``v_L = mean_n(h_L^this(n) - h_L^most(n))`` at the last prompt token; adding ``+alpha * v_L`` at the last
prompt position (and each generated token) steers answers towards the pixels, ``-alpha * v_L`` towards the prior.
Several layers (``layers=[...]``) each get their own ``v_L``, all added at once, as the official script does
with its ``--target_layers`` list.

**What the paper measures.** Its headline (92.5 % of colour, 74.6 % of size predictions shifted, arXiv v1) steers
the *"most"* prompt on the counterfactual image towards the pixel answer (``task_vectors_inference_WK_CF.py``:
baseline and steered runs both ask the "most" question; target = the counterfactual colour), counted as
"eligible flips": of the items whose baseline answer is not the target, the share whose answer changed and now
matches it (:func:`haltrace.data.answers.eligible_flips`). The reverse script (CF -> WK) steers the
"this" prompt towards the prior. Flipping the "this" prompt towards the pixels (haltrace's earlier quantity) is
a different number: the vector maps "most" states onto "this" states, and adding it to "this" states
extrapolates. :func:`haltrace.evals.counterfactual.evaluate_pvp` measures either prompt on any model; on the
organism the suite reports both (``counterfactual.most_prior_to_pixel`` is the paper's quantity,
``counterfactual.prior_to_pixel`` the "this" one) with the broken-answer rates (neither prior nor pixel) beside
them.

**Answers** are whole greedy generations (20 new tokens, as the official code), compared after normalisation
(case, punctuation, ``_``) as whole answers with the official colour-synonym map ("gold" counts as yellow):
:func:`haltrace.data.answers.answer_matches`.

Layer convention (``haltrace.conventions``): the vector is read at ``resid_post.L`` (output of block ``L`` ==
HF ``hidden_states[L+1]``) and added to the same point, ``resid_post.L``. The official code builds the vector
from ``hidden_states[l]`` but adds it to the output of ``layers[l]`` (== ``hidden_states[l+1]``): an
off-by-one we do not copy (methods-vlm.md §1 pitfall 1). In the paper's capture index our layer ``L`` is
``hidden_states[L+1]``; in its injection index (``--target_layers``) it is ``L``.

**Selection** (default): the fit items are split in two random halves (``seed``), a vector is built on one half
for every layer and every ``alpha`` in a grid, and the other half is answered under steering on the paper's
prompt for the direction ("most" towards pixels, "this" towards the prior; ``select_on`` overrides); the
``(layer, alpha)`` with the best held-out target rate (plus colour-control accuracy, for steering towards pixels)
wins, ties going to the smaller ``alpha`` and the earlier layer. Every grid row records the eligible-flip and
broken-answer rates. The final vectors are means over all fit items.

``preset="paper"``: scale 1 (the official code adds the mean difference unscaled), answers of 20 tokens, no
colour-control term; the layers are ``layers=`` when given, otherwise the single layer with the best held-out
target rate at scale 1 (the official script takes ``--target_layers`` on its command line and publishes no
default; this choice is listed in ``provenance["deviations"]``, with every other difference from the paper).

Fidelity (paper / official code step -> haltrace -> same or different):

==============================================  ==========================  =======================================
"this" / "most" prompts on the CF image         ``fit`` (``PvPItem``)       same
``v_l = mean(h_l^this - h_l^most)``, last token  ``fit``                     same; read and added at resid_post.L
                                                                            (official: read hidden_states[l],
                                                                            added after layers[l]: off by one)
add ``v_l`` at position -1 of every forward      ``fit`` (``Add`` last+gen)  same
scale 1, ``--target_layers`` from the CLI        ``fit(preset="paper")``     same scale; layer chosen on a
                                                                            held-out half unless ``layers=``
greedy, 20 tokens, lower-case, synonym map       ``evaluate_pvp``            same (punctuation also dropped)
eligible flips on the "most" prompt -> pixel     ``evaluate_pvp``            same; on a held-out set (official:
                                                                            the vector's own items)
keep-top-100 ablation, size task                 -                           not implemented (Visual CounterFact
                                                                            size rows load as items)
==============================================  ==========================  =======================================

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                                     # doctest: +SKIP
>>> fitted = get_method("pvp").fit(model, direction="pixels")                   # doctest: +SKIP
>>> fitted.provenance["layers"]                                                 # doctest: +SKIP
{'haltrace': 'resid_post.2', ...}
>>> from haltrace.evals.counterfactual import evaluate_pvp
>>> evaluate_pvp(model, fitted, items, prompt="most")["eligible_flip_rate"]      # doctest: +SKIP

The helpers it shares with the other VLM methods (last-token states without padding, layer records) live in
:mod:`haltrace.steering.fitdata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.answers import answer_matches, eligible_flips, label_answers, normalise_answer
from haltrace.data.items import PvPItem, VQAQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.errors import InputError
from haltrace.steering.engine import Add
from haltrace.steering.fitdata import (
    PVP_FIT_SEED,
    item_prompts,
    items_fingerprint,
    last_token_states,
    layer_record,
    next_words,
    require_vlm,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method

__all__ = ["PvP", "PvPItem", "generated_answers", "last_token_states", "next_words", "normalise_answer"]

PAPER = ("Golovanevsky, Rudman et al., 'Pixels Versus Priors: Controlling Knowledge Priors in Vision-Language "
         "Models through Visual Counterfacts', arXiv 2505.17127 (EMNLP 2025); code rsinghlab/pixels_vs_priors@52d8ae0")
PRESETS = ("paper",)
PROMPTS = ("most", "this")
#: the official code adds the mean difference unscaled, and generates 20 new tokens per answer
PAPER_ALPHA = 1.0
PAPER_MAX_NEW_TOKENS = 20


def paper_prompt(direction: str) -> str:
    """The prompt the paper steers for ``direction``: "most" towards the pixels (WK -> CF), "this" towards the
    prior (CF -> WK)."""
    return "most" if direction == "pixels" else "this"


# --------------------------------------------------------------------------------------- answers
@torch.no_grad()
def generated_answers(model: Any, questions: Sequence[str], images: Sequence[Any], *,
                      interventions: Sequence[Any] = (), max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
                      template: str | None = None, batch_size: int = 16) -> list[str]:
    """Greedy whole answers (up to ``max_new_tokens``) to plain ``questions`` about ``images``, under
    ``interventions`` (the official code's ``generate(max_new_tokens=20, do_sample=False)``), decoded without
    special tokens and stripped."""
    from contextlib import nullcontext

    from haltrace.data.images import open_image
    from haltrace.steering.engine import steer

    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    prompts = item_prompts(model, questions, images, template=template)
    tok = model.tokenizer
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": False, "num_beams": 1}
    if getattr(model.hf.generation_config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    with steer(model, *interventions) if interventions else nullcontext():
        for start in range(0, len(prompts), batch_size):
            idx = range(start, min(len(prompts), start + batch_size))
            opened = [open_image(images[i]) for i in idx]
            inputs = model.prepare([prompts[i] for i in idx], None if all(im is None for im in opened) else opened)
            generated = model.hf.generate(**inputs, **kwargs)
            new = generated[:, inputs["input_ids"].shape[1]:]
            out += [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def pvp_questions(items: Sequence[PvPItem], prompt: str) -> list[str]:
    """Each item's ``most_question`` (``prompt="most"``) or ``this_question`` (``"this"``)."""
    if prompt not in PROMPTS:
        raise InputError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    return [it.most_question if prompt == "most" else it.this_question for it in items]


def _rate(answers: Sequence[str], targets: Sequence[str]) -> float:
    """Share of answers matching their target (whole normalised answer, colour synonyms)."""
    return (float(np.mean([answer_matches(a, t) for a, t in zip(answers, targets, strict=True)]))
            if targets else 0.0)


# --------------------------------------------------------------------------------------- the method
@register_method
class PvP(Method):
    """Pixels-vs-priors steering: ``±alpha * mean(h_this - h_most)`` at the last prompt token of each layer.

    >>> fitted = PvP().fit(model, direction="priors")                  # doctest: +SKIP
    >>> with fitted.apply(model):                                       # doctest: +SKIP
    ...     model.hf(**inputs)
    """

    name = "pvp"
    summary = "Pixels vs priors: mean(this - most) difference at the last prompt token, +/- towards pixels/priors"

    def fit(self, model: Any, data: Sequence[Any] | None = None, *, direction: str = "pixels",
            layer: int | None = None, layers: Sequence[int] | None = None, alpha: float | None = None,
            alphas: Sequence[float] = (1.0, 2.0, 4.0, 8.0), steer_generated: bool = True, n_items: int = 64,
            seed: int = PVP_FIT_SEED, template: str | None = None, select_on: str | None = None,
            max_new_tokens: int = PAPER_MAX_NEW_TOKENS, preset: str | None = None) -> FittedIntervention:
        """Build the vectors from ``data`` and choose the layer and ``alpha`` on a held-out half unless given.

        ``data``: :class:`~haltrace.data.PvPItem` items (a counterfactual image, its "this" and "most" questions,
        prior and pixel answers), plus optional :class:`~haltrace.data.VQAQuestion` colour questions on ordinary
        objects (the control that steering towards pixels must not break). Default: the model's data source
        (an organism's ``n_items`` counterfactual images drawn with ``seed``). Questions are plain; prompts come
        from the model's chat template or ``template``.

        ``layers=[...]`` steers several layers at once, each with its own vector (``layer=L`` is ``layers=[L]``);
        without either, the single best layer is chosen. ``select_on`` ("most" / "this"): the prompt the
        held-out selection steers (default: the paper's for ``direction``). ``max_new_tokens``: length of the
        greedy answers compared in the selection. ``preset="paper"``: scale 1, no colour-control term.

        ``steer_generated=True`` also adds the vector to every generated token, as the official code does
        (it wraps the layer and adds at the last position of every forward).
        """
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown PvP preset {preset!r}; the only preset is 'paper'")
        if direction not in ("pixels", "priors"):
            raise InputError(f"direction must be 'pixels' or 'priors', got {direction!r}")
        select_on = paper_prompt(direction) if select_on is None else select_on
        if select_on not in PROMPTS:
            raise InputError(f"select_on must be one of {PROMPTS}, got {select_on!r}")
        if int(max_new_tokens) < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        require_vlm(model, "PvP (pvp)", "it contrasts two questions about the same image")
        chosen_layers = self._layers(model, layer, layers)
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_items, seed=seed)
        all_items = list(data)
        data = of_kind(all_items, PvPItem, method=self.name)
        control_items = [q for q in all_items if isinstance(q, VQAQuestion)]
        described = (f"{len(data)} PvP items, {len(control_items)} colour-control questions ("
                     f"{'given' if source is not None else 'the model data source default'})")
        if len(data) < 2:
            raise ValueError(f"PvP needs at least 2 items, got {len(data)}")
        images = [d.image for d in data]
        this_prompts = item_prompts(model, [d.this_question for d in data], images, template=template)
        most_prompts = item_prompts(model, [d.most_question for d in data], images, template=template)
        this = last_token_states(model, this_prompts, images)
        most = last_token_states(model, most_prompts, images)
        diffs = this - most  # [N, L, d]
        sign = 1.0 if direction == "pixels" else -1.0

        if alpha is not None:
            grid = [float(alpha)]
        elif preset == "paper":
            grid = [PAPER_ALPHA]
        else:
            grid = [float(a) for a in alphas]
        candidates = [tuple(chosen_layers)] if chosen_layers else [(i,) for i in range(model.n_layers)]
        use_control = bool(control_items) and direction == "pixels" and preset != "paper"
        selection: list[dict] = []
        if len(candidates) * len(grid) > 1:
            if not all(d.prior and d.pixel for d in data):
                raise ValueError("choosing the layer/alpha needs items with prior and pixel answers; pass "
                                 "layer= (or layers=) and alpha= for unlabelled data")
            selection = self._select(model, data, diffs, candidates, grid, sign, direction, select_on,
                                     control_items if use_control else [], int(max_new_tokens), template,
                                     steer_generated, seed)
            best = max(selection, key=lambda r: (round(r["score"], 6), -r["alpha"], -min(r["layers"])))
            picked, chosen_alpha = tuple(best["layers"]), best["alpha"]
        else:
            picked, chosen_alpha = candidates[0], grid[0]

        interventions: list[Add] = []
        norms: dict[str, float] = {}
        for layer_index in picked:
            vector = diffs[:, layer_index].mean(0)
            hook = f"resid_post.{layer_index}"
            norms[hook] = float(vector.norm())
            interventions.append(Add(hook, vector, alpha=sign * chosen_alpha, positions="last", phase="prompt"))
            if steer_generated:
                interventions.append(Add(hook, vector, alpha=sign * chosen_alpha, positions="all",
                                         phase="generation"))
        provenance = {
            "method": self.name, "paper": PAPER, "direction": direction, "preset": preset,
            "deviations": self._deviations(preset, chosen_layers, grid, chosen_alpha, use_control, select_on,
                                           direction, steer_generated, max_new_tokens),
            "layers": self._layer_provenance(picked),
            "alpha": sign * chosen_alpha, "alpha_grid": grid,
            "vector_norm": float(np.sqrt(sum(v * v for v in norms.values()))), "vector_norm_by_hook": norms,
            "vector_norm_by_layer": [float(v) for v in diffs.mean(0).norm(dim=-1)],
            "positions": "last prompt token" + (" + every generated token" if steer_generated else ""),
            "phase": "prompt" + ("+generation" if steer_generated else ""),
            "selection": selection, "selection_prompt": select_on,
            "selection_rule": (f"max held-out target rate on the '{select_on}' prompt"
                               + (" + colour-control accuracy" if use_control else "")
                               + f" (whole greedy answers of up to {max_new_tokens} tokens, normalised, colour "
                                 f"synonyms) on a random 50/50 split of the fit items (seed {seed}); ties: "
                                 "smaller alpha, earlier layer")
            if selection else "none (layers and alpha given)",
            "answers": "whole greedy answers, lower-cased, punctuation dropped, official colour-synonym map",
            "data": {"description": described, "n": len(data), "n_control": len(control_items),
                     "fingerprint": items_fingerprint(all_items)},
        }
        return FittedIntervention(self.name, interventions, provenance)

    @staticmethod
    def _layers(model: Any, layer: int | None, layers: Sequence[int] | None) -> list[int]:
        """The layers given (``layer`` or ``layers``), each in range and in the model's positive index; ``[]``
        when the layer is to be chosen."""
        if layer is not None and layers is not None:
            raise InputError("pass layer=L or layers=[...], not both")
        given = [layer] if layer is not None else (list(layers) if layers is not None else [])
        if layers is not None and not given:
            raise InputError("layers=[] names no layer; leave it out to choose one")
        out: list[int] = []
        for value in given:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"layer {value!r} is not an integer")
            if not -model.n_layers <= int(value) < model.n_layers:
                raise InputError(f"layer {value} out of range; this model has layers 0..{model.n_layers - 1}")
            if int(value) % model.n_layers not in out:
                out.append(int(value) % model.n_layers)
        return sorted(out)

    @staticmethod
    def _layer_provenance(picked: Sequence[int]) -> dict:
        official = "(official code: capture hidden_states[l], inject layers[l])"
        if len(picked) == 1:
            return layer_record(f"resid_post.{picked[0]}", f"capture hidden_states[{picked[0] + 1}], inject "
                                                          f"--target_layers {picked[0]} {official}")
        return {"haltrace": [f"resid_post.{i}" for i in picked],
                "hf_hidden_states_index": [str(i + 1) for i in picked],
                "paper": f"capture hidden_states{[i + 1 for i in picked]}, inject --target_layers "
                         f"{' '.join(map(str, picked))} {official}"}

    @staticmethod
    def _deviations(preset: str | None, given_layers: list[int], grid: list[float], alpha: float,
                    use_control: bool, select_on: str, direction: str, steer_generated: bool,
                    max_new_tokens: int) -> list[str]:
        out = ["vector read and added at resid_post.L (official: read hidden_states[l], added to layers[l]'s "
               "output = hidden_states[l+1], an off-by-one not copied)"]
        if not given_layers:
            out.append("layer chosen by held-out target rate on half the fit items (official: --target_layers "
                       "given on the command line, no published default)")
        if len(grid) > 1:
            out.append(f"alpha chosen from {grid} on held-out items (official: scale 1, no selection)")
        if alpha != PAPER_ALPHA:
            out.append(f"alpha {alpha:g} (official: 1)")
        if use_control:
            out.append("selection also rewards colour-control accuracy (not in the paper)")
        if select_on != paper_prompt(direction):
            out.append(f"selection steers the '{select_on}' prompt (paper: '{paper_prompt(direction)}' for "
                       f"{direction})")
        if not steer_generated:
            out.append("generated tokens not steered (official: every forward's last position)")
        if max_new_tokens != PAPER_MAX_NEW_TOKENS:
            out.append(f"selection answers of {max_new_tokens} tokens (official: {PAPER_MAX_NEW_TOKENS})")
        return out

    @staticmethod
    def _select(model: Any, data: list[PvPItem], diffs: torch.Tensor, candidates: list[tuple[int, ...]],
                grid: list[float], sign: float, direction: str, select_on: str, control: Sequence[VQAQuestion],
                max_new_tokens: int, template: str | None, steer_generated: bool, seed: int) -> list[dict]:
        """Held-out rates for every (layers, alpha): vectors from half A, answers on half B (a random half drawn
        with ``seed``; alternate items would split the organism's kinds apart), steered as the final fit steers:
        the last prompt token, and every generated token with ``steer_generated``."""
        n = len(data)
        order = np.random.default_rng(seed).permutation(n)
        half_a = sorted(int(i) for i in order[: n // 2])
        half_b = [data[int(i)] for i in sorted(order[n // 2:])]
        questions, images = pvp_questions(half_b, select_on), [d.image for d in half_b]
        targets = [d.pixel if direction == "pixels" else d.prior for d in half_b]
        prior, pixel = [d.prior for d in half_b], [d.pixel for d in half_b]
        kwargs = {"max_new_tokens": max_new_tokens, "template": template}
        baseline = generated_answers(model, questions, images, **kwargs)
        rows = []
        for layers in candidates:
            vectors = {i: diffs[half_a, i].mean(0) for i in layers}
            for a in grid:
                add = [Add(f"resid_post.{i}", v, alpha=sign * a, positions="last", phase="prompt")
                       for i, v in vectors.items()]
                if steer_generated:
                    add += [Add(f"resid_post.{i}", v, alpha=sign * a, positions="all", phase="generation")
                            for i, v in vectors.items()]
                answers = generated_answers(model, questions, images, interventions=add, **kwargs)
                rate = _rate(answers, targets)
                labels = label_answers(answers, prior, pixel)
                row = {"layer": layers[0] if len(layers) == 1 else list(layers), "layers": list(layers),
                       "alpha": a, "target_rate": rate, "score": rate,
                       "eligible_flip_rate": eligible_flips(baseline, answers, targets)["eligible_flip_rate"],
                       "broken_rate": labels.count("other") / len(labels)}
                if control:
                    control_answers = generated_answers(model, [c.question for c in control],
                                                        [c.image for c in control], interventions=add, **kwargs)
                    acc = _rate(control_answers, [c.answer for c in control])
                    row["control_accuracy"] = acc
                    row["score"] = rate + acc
                rows.append(row)
        return rows
