"""ITI — Inference-Time Intervention (Li et al., NeurIPS 2023, arXiv 2306.03341; ``likenneth/honest_llama``).

Recipe (see ``shared/research/methods-llm-eval.md`` §2.1), transposed to yes/no questions about images:

1. Probe data: every fit yes/no question with *both* answers appended ("is there a knife ? answer : yes" /
   "... no"), label 1 when the statement is true for the image (ITI's ``"Q: .. A: choice"`` with true/false
   choices).
2. Class balance: the answer word is shared across labels, and the fit sets ask about about twice as many
   absent as present objects. Unweighted, the mass mean is ``[n_p (a_yes - a_no | present) - n_a (a_yes - a_no |
   absent)] / n``: a net "say no" push of ``(n_a - n_p) / n`` times the answer-word difference, whatever the image
   shows, and a head reading only the answer word ranks at ``n_a / n`` accuracy. With ``balance="classes"``
   (default) present- and absent-object questions get equal total weight in the probes, their held-out ranking,
   the mass mean and sigma. TruthfulQA's answers share no answer token, so the paper has nothing to cancel.
3. Activations: ``head_out.l`` (the input of ``o_proj``, per head) at the last token (the answer word).
4. Per-head logistic-regression probes, scored by accuracy on a held-out split (by image); top ``k`` heads.
5. Direction per head: mass-mean shift ``mean(true) - mean(false)``, unit norm; ``sigma`` = std (ddof 0, as
   ``np.std``) of the activations projected on it (ITI computes it on its tuning set; here on the fit set).
   Each head's residual-space direction ``W_O[:, head] @ theta`` is compared with the answer-token direction
   (unembedding row "yes" minus "no"): the cosines are in ``provenance["heads"]``.
6. Intervention ``x_h <- x_h + alpha * sigma_h * theta_h`` (paper alpha = 15), at position -1 of every forward:
   the last prompt token (which produces the answer) and every generated token.

Implementation: the shift is applied at ``attn_out.l`` as ``W_O[:, head slice] @ (alpha * sigma * theta)`` with
``W_O`` read in ``nn.Linear``'s ``[out, in]`` layout (:func:`o_proj_weight` transposes GPT-2's ``Conv1D``);
``o_proj`` is linear, so this is exactly the edit of adding in head space before ``o_proj`` (honest_llama #42:
edit before o_proj), as the engine's ``Add("head_out.L", v, head=h)`` would.
``k`` defaults to the paper's ratio (48 of 1024 heads, rounded up): 1 head for the 16-head organism;
``preset="paper"`` takes K=48 and alpha=15 (honest_llama's ``validate_2fold.py`` defaults, as in its README
command and its replication sweep), K falling back to the ratio on models with fewer than 48 heads.
Every difference from the paper is listed in ``provenance["deviations"]``.

Fidelity (paper / official code step -> haltrace -> same or different):

================================================  =========================  =======================================
"Q: .. A: .." with true/false answers (tqa_mc2)   ``fit``                    different: yes/no image questions,
                                                                             both answers appended
o_proj input at the last token, per head          ``question_states``        same (GQA-safe ``n_heads`` reshape)
sklearn LR per head (max_iter 1000), top K by     ``fit``                    same probe; ranked on a 70/30 image
validation accuracy                                                          split (paper: 2 folds, val 0.2)
center-of-mass direction, unit norm               ``fit``                    same, class-balanced (see 2.)
sigma = np.std of tuning-set projections          ``fit``                    fit set (no separate tuning set)
``x_h += alpha * sigma * theta`` at position -1   ``head_interventions``     same (via W_O at attn_out; exact)
K = 48, alpha = 15                                ``fit(preset="paper")``    same; K = ratio under 48 heads
================================================  =========================  =======================================

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                 # doctest: +SKIP
>>> fitted = get_method("iti").fit(model, preset="paper")  # doctest: +SKIP
>>> fitted.provenance["deviations"]                        # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
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
    image_ids_of,
    image_split,
    items_fingerprint,
    question_states,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = "Li et al., Inference-Time Intervention: Eliciting Truthful Answers from a Language Model, NeurIPS 2023"
PAPER_K = 48  # honest_llama validate_2fold.py --num_heads default (K=48 of LLaMA-7B's 32x32 heads)
PAPER_HEAD_RATIO = PAPER_K / 1024
PAPER_ALPHA = 15.0  # --alpha default
PRESETS = ("paper",)
BALANCES = ("classes", "none")


def head_shift_vector(o_proj_weight: torch.Tensor, head: int, head_dim: int, shift: torch.Tensor) -> torch.Tensor:
    """Residual-space image ``W_O[:, head slice] @ shift`` of a head-space shift (exact: o_proj is linear).

    >>> head_shift_vector(torch.eye(4), 1, 2, torch.tensor([1.0, 2.0])).tolist()
    [0.0, 0.0, 1.0, 2.0]
    """
    if shift.numel() != head_dim:
        raise ValueError(f"shift has {shift.numel()} values but head_dim is {head_dim}")
    block = o_proj_weight[:, head * head_dim:(head + 1) * head_dim].detach().float().cpu()
    if block.shape[1] != head_dim:
        raise ValueError(f"head {head} is out of range for o_proj with input width {o_proj_weight.shape[1]}")
    return block @ shift.float()


def o_proj_weight(module: Any) -> torch.Tensor:
    """The output projection's weight as ``[out, in]`` (``nn.Linear``'s layout); GPT-2's ``Conv1D`` stores
    ``[in, out]`` and is transposed (its square weight would otherwise be read silently wrong)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.T if isinstance(module, Conv1D) else module.weight


def head_interventions(model: Any, shifts: dict[tuple[int, int], torch.Tensor]) -> list[Add]:
    """ITI's per-head shifts as engine ``Add`` interventions at ``attn_out.l``: last prompt token + every
    generated token (ITI adds at position -1 of each forward)."""
    per_layer: dict[int, torch.Tensor] = {}
    for (layer, head), shift in sorted(shifts.items()):
        if not 0 <= head < model.n_heads:
            raise ValueError(f"head {head} invalid: the model has heads 0..{model.n_heads - 1}")
        vec = head_shift_vector(o_proj_weight(model.adapter.o_proj(layer)), head, model.head_dim, shift)
        per_layer[layer] = per_layer.get(layer, torch.zeros_like(vec)) + vec
    out: list[Add] = []
    for layer, vec in per_layer.items():
        out.append(Add(f"attn_out.{layer}", vec, alpha=1.0, positions="last", phase="prompt"))
        out.append(Add(f"attn_out.{layer}", vec, alpha=1.0, positions="all", phase="generation"))
    return out


def paper_k(total_heads: int) -> int:
    """The paper's K: 48 heads (honest_llama's ``--num_heads`` default), or, on a model with fewer than 48 heads
    in all, the paper's ratio 48/1024 rounded up.

    >>> paper_k(1024), paper_k(144), paper_k(16)
    (48, 48, 1)
    """
    return PAPER_K if total_heads >= PAPER_K else max(1, math.ceil(PAPER_HEAD_RATIO * total_heads))


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[:, None] * x).sum(0) / w.sum()


@register_method
class ITI(Method):
    """Inference-time intervention: shift the top-k truth-probing heads along their mass-mean direction."""

    name = "iti"
    summary = ("per-head truth probes on head_out; shift top-k heads by alpha*sigma along class-balanced "
               "mass-mean directions")

    def fit(self, model: Any, data: Sequence[YesNoQuestion] | None = None, *, n_images: int = 300,
            seed: int = TRUTHPRINT_FIT_SEED, k: int | None = None, alpha: float | None = None, balance: str | None = None,
            preset: str | None = None, **kw: Any) -> FittedIntervention:
        """Fit per-head probes on yes/no questions (:class:`~haltrace.data.YesNoQuestion`; default: the model's
        data source, e.g. an organism's fresh questions).

        ``balance``: ``"classes"`` (default) gives present- and absent-object questions equal weight in the
        probes, their ranking, the mass-mean direction and sigma; ``"none"`` weights every row alike.
        ``preset="paper"``: K=48 heads (the paper's ratio on models with fewer heads) and alpha=15, unless
        given explicitly. Default ``k``: the paper's ratio 48/1024, rounded up.
        """
        from sklearn.linear_model import LogisticRegression

        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown ITI preset {preset!r}; the only preset is 'paper'")
        balance = "classes" if balance is None else balance
        if balance not in BALANCES:
            raise InputError(f"balance must be one of {BALANCES}, got {balance!r}")
        total = model.n_layers * model.n_heads
        if k is None:
            k = paper_k(total) if preset == "paper" else max(1, math.ceil(PAPER_HEAD_RATIO * total))
        k = int(k)
        if not 1 <= k <= total:
            raise ValueError(f"k must be in 1..{total} (layers x heads), got {k}")
        alpha = PAPER_ALPHA if alpha is None else float(alpha)
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        questions = of_kind(data, YesNoQuestion, method=self.name)
        items = [q for q in questions for _ in (0, 1)]
        answers = [a for _ in questions for a in ("yes", "no")]
        labels = np.array([int((a == "yes") == q.present) for q, a in zip(items, answers, strict=True)])
        # the class of a row is its question's truthful answer: present ("yes") or absent ("no") object
        classes = ["yes" if q.present else "no" for q in items]
        hooks = [f"head_out.{i}" for i in range(model.n_layers)]
        _, acts = question_states(model, items, hooks, append=answers)
        # split by the questions' images: both answers of one question stay on one side, also for text-only
        # questions (no image, no image_id: grouped by their position among the questions)
        held = image_split([key for key in image_ids_of(questions) for _ in (0, 1)], seed=seed)

        def weights(mask: np.ndarray) -> np.ndarray:
            chosen = [c for c, m in zip(classes, mask, strict=True) if m]
            return class_weights(chosen) if balance == "classes" else np.full(len(chosen), 1.0 / len(chosen))

        w_train, w_held = weights(~held), weights(held)
        scores = np.zeros((model.n_layers, model.n_heads))
        for layer in range(model.n_layers):
            x_all = acts[f"head_out.{layer}"].numpy()  # [N, H, head_dim]
            for head in range(model.n_heads):
                x = x_all[:, head]
                clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x[~held], labels[~held],
                                                                                sample_weight=w_train)
                scores[layer, head] = clf.score(x[held], labels[held], sample_weight=w_held)
        order = np.argsort(-scores, axis=None, kind="stable")[:k]
        top = [(int(i // model.n_heads), int(i % model.n_heads)) for i in order]
        y = torch.from_numpy(labels).bool()
        w_all = torch.from_numpy(weights(np.ones(len(items), dtype=bool))).float()
        answer_dir = answer_direction(model)
        shifts, detail = {}, {}
        for layer, head in top:
            x = acts[f"head_out.{layer}"][:, head]
            theta = _weighted_mean(x[y], w_all[y]) - _weighted_mean(x[~y], w_all[~y])
            theta = theta / theta.norm().clamp_min(1e-12)
            plain = x[y].mean(0) - x[~y].mean(0)
            proj = x @ theta
            mean = (w_all * proj).sum() / w_all.sum()
            sigma = float(((w_all * (proj - mean) ** 2).sum() / w_all.sum()).sqrt())  # np.std's ddof=0, weighted
            shifts[(layer, head)] = alpha * sigma * theta
            o_proj = o_proj_weight(model.adapter.o_proj(layer))
            detail[f"head_out.{layer}[{head}]"] = {
                "val_accuracy": float(scores[layer, head]), "sigma": sigma,
                "answer_direction_cosine": cosine(head_shift_vector(o_proj, head, model.head_dim, theta), answer_dir),
                "answer_direction_cosine_unbalanced": cosine(
                    head_shift_vector(o_proj, head, model.head_dim, plain), answer_dir)}
        interventions = head_interventions(model, shifts)
        total_shift = sum((iv.vector for iv in interventions if iv.phase == "prompt"),
                          torch.zeros(model.hidden_size))
        counts = {c: classes.count(c) // 2 for c in ("yes", "no")}
        spec = {"k": k, "alpha": alpha, "seed": seed, "n": len(items), "heads": top, "balance": balance}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "preset": preset,
            "deviations": self._deviations(k, total, alpha, balance, counts),
            "layers": {"haltrace": sorted({f"head_out.{layer}" for layer, _ in top}),
                       "paper": "same block index (honest_llama hooks layers[L].self_attn.o_proj input)",
                       "applied_at": sorted({f"attn_out.{layer}" for layer, _ in top}),
                       "why_attn_out": "W_O @ head-space shift == head-space shift before o_proj (o_proj is linear)"},
            "heads": detail, "k": k, "alpha": alpha,
            "alpha_units": "x sigma (std of activations projected on the unit mass-mean direction)",
            "direction": "mass_mean (center of mass), unit norm" + (", class-balanced" if balance == "classes"
                                                                    else ""),
            "balance": balance, "class_counts": counts,
            "answer_direction": "unembedding row 'yes' minus 'no' (mean over the tokenizer's first-token forms); "
                                "cosines of each head's residual-space direction W_O[:, head] @ theta",
            "answer_direction_cosine": cosine(total_shift, answer_dir),
            "val_accuracy_by_head": scores.tolist(),
            "positions": "last prompt token (prompt phase) + every generated token (generation phase)",
            "phase": "both",
            "data": {"description": "fit yes/no questions with both answers appended; label = statement true; "
                                    "probes on 70% of images, head ranking by accuracy on the other 30%"
                                    + (" (both class-weighted: present and absent questions count alike)"
                                       if balance == "classes" else ""),
                     "n_statements": len(items), "seed": seed, "fingerprint": items_fingerprint(questions),
                     "source": "given" if source is not None else "default (model's data source)"},
            "fingerprint": fingerprint(*shifts.values(), spec=spec),
        }
        return FittedIntervention(self.name, interventions, provenance)

    @staticmethod
    def _deviations(k: int, total: int, alpha: float, balance: str, counts: dict[str, int]) -> list[str]:
        out = ["probe data: yes/no image questions with both answers appended, label = statement true (paper: "
               "TruthfulQA 'Q: .. A: ..' with true and false answers)",
               "heads ranked on a 70/30 split by image (paper: 2 folds by question, 20% of the training fold "
               "for validation)",
               "sigma on the fit set (paper: a separate tuning set, tqa_gen_end_q)"]
        if balance == "classes":
            out.append("class-balanced probes, ranking, mass mean and sigma (paper: unweighted; its TruthfulQA "
                       "answers share no answer token, so it has no answer-word confound to cancel)")
        else:
            out.append(f"unbalanced ({counts['no']} absent : {counts['yes']} present questions): the mass mean "
                       "carries a net answer-word push")
        if k != PAPER_K:
            out.append(f"K={k} of {total} heads (paper: {PAPER_K} of LLaMA-7B's 1024)")
        if alpha != PAPER_ALPHA:
            out.append(f"alpha {alpha:g} (paper: {PAPER_ALPHA:g})")
        return out
