"""ITI — Inference-Time Intervention (Li et al., NeurIPS 2023, arXiv 2306.03341; ``likenneth/honest_llama``).

Recipe (see ``shared/research/methods-llm-eval.md`` §2.1), transposed to the organism:

1. Probe data: every fit yes/no question with *both* answers appended ("is there a knife ? answer : yes" /
   "... no"), label 1 when the statement is true for the image (ITI's ``"Q: .. A: choice"`` with true/false
   choices). Because each question appears with both answers, the answer word alone carries no signal.
2. Activations: ``head_out.l`` (the input of ``o_proj``, per head) at the last token (the answer word).
3. Per-head logistic-regression probes, scored by accuracy on a held-out split (by image); top ``k`` heads.
4. Direction per head: mass-mean shift ``mean(true) - mean(false)``, unit norm; ``sigma`` = std of all
   activations projected on it (ITI computes it on its tuning set; here on the whole fit set).
5. Intervention ``x_h <- x_h + alpha * sigma_h * theta_h`` (paper alpha = 15), at position -1 of every forward:
   the last prompt token (which produces the answer) and every generated token.

Implementation: the engine's ``Add`` at ``head_out.l`` takes one head-size vector, so the shift is applied at
``attn_out.l`` as ``W_O[:, head slice] @ (alpha * sigma * theta)``; ``o_proj`` is linear, so this is exactly the
same edit as adding in head space before ``o_proj`` (pitfall #42 of honest_llama: edit before o_proj).
``k`` defaults to the paper's ratio (48 of 1024 heads, rounded up): 1 head for the 16-head organism.

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")                 # doctest: +SKIP
>>> fitted = get_method("iti").fit(model, k=2, alpha=15)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.items import YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.steering.engine import Add
from haltrace.steering.fitdata import (
    fingerprint,
    image_ids_of,
    image_split,
    items_fingerprint,
    question_states,
)
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.steering.truthprint import FIT_SEED

PAPER = "Li et al., Inference-Time Intervention: Eliciting Truthful Answers from a Language Model, NeurIPS 2023"
PAPER_HEAD_RATIO = 48 / 1024  # K=48 heads of LLaMA-7B's 32x32


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


@register_method
class ITI(Method):
    """Inference-time intervention: shift the top-k truth-probing heads along their mass-mean direction."""

    name = "iti"
    summary = "per-head truth probes on head_out; shift top-k heads by alpha*sigma along mass-mean directions"

    def fit(self, model: Any, data: Sequence[YesNoQuestion] | None = None, *, n_images: int = 300,
            seed: int = FIT_SEED, k: int | None = None, alpha: float = 15.0, **kw: Any) -> FittedIntervention:
        """Fit per-head probes on yes/no questions (:class:`~haltrace.data.YesNoQuestion`; default: the model's
        data source, e.g. an organism's fresh questions)."""
        from sklearn.linear_model import LogisticRegression

        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        total = model.n_layers * model.n_heads
        k = max(1, math.ceil(PAPER_HEAD_RATIO * total)) if k is None else int(k)
        if not 1 <= k <= total:
            raise ValueError(f"k must be in 1..{total} (layers x heads), got {k}")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        questions = of_kind(data, YesNoQuestion, method=self.name)
        items = [q for q in questions for _ in (0, 1)]
        answers = [a for _ in questions for a in ("yes", "no")]
        labels = np.array([int((a == "yes") == q.present) for q, a in zip(items, answers, strict=True)])
        hooks = [f"head_out.{i}" for i in range(model.n_layers)]
        _, acts = question_states(model, items, hooks, append=answers)
        # split by the questions' images: both answers of one question stay on one side, also for text-only
        # questions (no image, no image_id: grouped by their position among the questions)
        held = image_split([key for key in image_ids_of(questions) for _ in (0, 1)], seed=seed)
        scores = np.zeros((model.n_layers, model.n_heads))
        for layer in range(model.n_layers):
            x_all = acts[f"head_out.{layer}"].numpy()  # [N, H, head_dim]
            for head in range(model.n_heads):
                x = x_all[:, head]
                clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x[~held], labels[~held])
                scores[layer, head] = clf.score(x[held], labels[held])
        order = np.argsort(-scores, axis=None, kind="stable")[:k]
        top = [(int(i // model.n_heads), int(i % model.n_heads)) for i in order]
        shifts, detail = {}, {}
        y = torch.from_numpy(labels).bool()
        for layer, head in top:
            x = acts[f"head_out.{layer}"][:, head]
            theta = x[y].mean(0) - x[~y].mean(0)
            theta = theta / theta.norm().clamp_min(1e-12)
            sigma = float((x @ theta).std())
            shifts[(layer, head)] = alpha * sigma * theta
            detail[f"head_out.{layer}[{head}]"] = {"val_accuracy": float(scores[layer, head]), "sigma": sigma}
        interventions = head_interventions(model, shifts)
        spec = {"k": k, "alpha": alpha, "seed": seed, "n": len(items), "heads": top}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "layers": {"haltrace": sorted({f"head_out.{layer}" for layer, _ in top}),
                       "paper": "same block index (honest_llama hooks layers[L].self_attn.o_proj input)",
                       "applied_at": sorted({f"attn_out.{layer}" for layer, _ in top}),
                       "why_attn_out": "W_O @ head-space shift == head-space shift before o_proj (o_proj is linear)"},
            "heads": detail, "k": k, "alpha": alpha,
            "alpha_units": "x sigma (std of activations projected on the unit mass-mean direction)",
            "direction": "mass_mean (center of mass), unit norm",
            "val_accuracy_by_head": scores.tolist(),
            "positions": "last prompt token (prompt phase) + every generated token (generation phase)",
            "phase": "both",
            "data": {"description": "fit yes/no questions with both answers appended; label = statement true; "
                                    "probes on 70% of images, head ranking by accuracy on the other 30%",
                     "n_statements": len(items), "seed": seed, "fingerprint": items_fingerprint(questions),
                     "source": "given" if source is not None else "default (model's data source)"},
            "fingerprint": fingerprint(*shifts.values(), spec=spec),
        }
        return FittedIntervention(self.name, interventions, provenance)
