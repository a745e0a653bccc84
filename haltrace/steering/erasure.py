"""Knowledge erasure / ProjectAway (Jiang, Kachinthaya, Petryk, Gandelsman, "Interpreting and Editing
Vision-Language Representations to Mitigate Hallucinations", arXiv 2410.02762, ICLR 2025).

At inference, for every image:

1. **Detect** objects that are likely absent: the internal confidence ``c_o`` of each candidate object word
   (max over layers and image-token positions of the logit-lens probability of the word,
   :func:`haltrace.trace.lens.image_token_confidence`) below a threshold flags ``o`` as absent — the paper's
   realistic setting, where the hallucinated objects are unknown and low-``c_o`` objects are erased.
2. **Erase** them during the prefill: at the output of decoder block ``edit_layer`` (``resid_post.l_I``), for
   each image token ``h_i`` and each flagged object's text representation ``t``, sequentially,
   ``p = <h_i, t> / <t, t>``; if ``p > 0``: ``h_i <- h_i - w * p * t``. Only positive projections are removed
   and decoding steps are untouched (the image tokens' keys and values are cached from the edited prefill).

Text representation ``t`` (``text_rep``): ``"unembed"`` (the word's unembedding row, its lens direction),
``"embed"`` (mean input embedding of its tokens; the paper's "layer -1" variant) or ``"resid_post.k"`` (state
of ``<bos> word`` with no image at the last token; the paper's text layer ``l_T = k + 1`` since it indexes
``hidden_states`` with 0 = embeddings). The edit layer ``resid_post.l`` is the paper's ``l_I = l`` (a forward
hook on ``layers[l_I]``) == HF ``hidden_states[l+1]``.

Choices made on the fit data (never the eval sets): the lens variant (final norm applied or not, the paper
decodes without it) with the better present/absent AUROC of ``c_o``; the threshold maximising balanced
accuracy of "``c_o`` < threshold => absent"; and, unless given, ``(edit_layer, text_rep, weight)`` from a grid
by the lowest fit CHAIR_i whose recall drops by at most ``max_recall_drop``.

>>> from haltrace.steering.registry import get_method
>>> fitted = get_method("erasure").fit(model)                    # doctest: +SKIP
>>> with fitted.apply(model):                                      # doctest: +SKIP
...     model.hf.generate(**inputs, max_new_tokens=10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from haltrace.data.images import open_image
from haltrace.data.items import CaptionItem, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.conventions import HookPoint
from haltrace.steering.fitdata import (
    PVP_FIT_SEED,
    item_prompts,
    items_fingerprint,
    last_token_states,
    layer_record,
    require_vlm,
)
from haltrace.steering.context import NOT_FORWARDED_KEYS, image_forward_inputs
from haltrace.steering.interventions import Intervention, Phase, PositionRule, register_state_type
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.trace.lens import image_token_confidence, target_token_ids

PAPER = ("Jiang, Kachinthaya, Petryk, Gandelsman, 'Interpreting and Editing Vision-Language Representations "
         "to Mitigate Hallucinations', arXiv 2410.02762 (ICLR 2025); code nickjiang2378/vl-interp@5cd5a3c")


# --------------------------------------------------------------------------------------- pieces

def erase(h: torch.Tensor, directions: torch.Tensor, weight: float) -> torch.Tensor:
    """ProjectAway on rows ``h [n, d]``: for each direction in order, remove ``weight`` x its positive
    projection (the paper's sequential rule, not a joint orthogonal projection).

    >>> h = erase(torch.randn(5, 4), torch.randn(2, 4), 1.0)
    >>> h.shape
    torch.Size([5, 4])
    """
    for t in directions:
        t = t.to(h.dtype)
        p = (h @ t) / (t @ t)
        h = h - weight * p.clamp_min(0.0)[:, None] * t
    return h


@torch.no_grad()
def text_representations(model: Any, words: Sequence[str], text_rep: str = "unembed") -> torch.Tensor:
    """``[K, d]`` text representation of each word (see the module docstring for the variants)."""
    if text_rep in ("unembed", "embed"):
        _, pieces = target_token_ids(model.tokenizer, list(words))
        weight = (model.adapter.unembed if text_rep == "unembed" else model.adapter.embed).weight
        if text_rep == "unembed":  # the lens direction of the word's first token (the token it must emit)
            return torch.stack([weight[p[0]].float().cpu() for p in pieces])
        return torch.stack([weight[p].float().mean(0).cpu() for p in pieces])
    if text_rep.startswith(("resid_post.", "resid_pre.")):
        return last_token_states(model, list(words), None, hooks=[text_rep])[:, 0]
    raise ValueError(f"text_rep must be 'unembed', 'embed' or 'resid_post.<k>', got {text_rep!r}")


# the prompt's inputs for an extra forward now live in the engine's context; kept importable from here
__all__ = ["NOT_FORWARDED_KEYS", "image_forward_inputs"]


@register_state_type
@dataclass
class ProjectAwayEdit(Intervention):
    """ProjectAway at one site: per new prompt (:meth:`prepare`), flag each row's objects with internal
    confidence ``c_o < threshold``; during that prompt's forward, erase the flagged objects' ``directions`` from
    the row's image tokens (:func:`erase`, sequential, positive projections only). ``log`` receives the flagged
    words of every row (runtime only).

    >>> edit = ProjectAwayEdit("resid_post.1", torch.randn(2, 8), objects=["cup", "fork"], threshold=0.1)
    >>> edit.positions, edit.phase
    ('image', 'prompt')
    """

    directions: torch.Tensor = field(default=None)  # type: ignore[assignment]
    objects: Sequence[str] = ()
    threshold: float = 0.0
    weight: float = 1.0
    lens_norm: bool = True
    positions: PositionRule = field(default="image", kw_only=True)
    phase: Phase = field(default="prompt", kw_only=True)
    log: list = field(default_factory=list, init=False, repr=False)
    _select: torch.Tensor | None = field(default=None, init=False, repr=False)
    prepares: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.directions is None:
            raise ValueError("ProjectAwayEdit needs directions (one text representation per object)")
        self.directions = torch.as_tensor(self.directions, dtype=torch.float32).detach().clone()
        if not bool(torch.isfinite(self.directions).all()):
            raise ValueError("the erasure directions contain NaN or inf (from a damaged saved fit? refit ProjectAway)")
        self.objects = [str(o) for o in self.objects]
        self.threshold, self.weight, self.lens_norm = float(self.threshold), float(self.weight), bool(self.lens_norm)

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        if point.kind not in ("resid_post", "resid_pre"):
            raise ValueError(f"ProjectAway edits the residual stream (resid_post.<layer>), not {point.name!r}")
        if self.directions.shape != (len(self.objects), model.hidden_size):
            raise ValueError(f"erasure directions are {tuple(self.directions.shape)} but need one row of the model's "
                             f"hidden size per object: ({len(self.objects)}, {model.hidden_size})")
        return point

    def prepare(self, model: Any, ctx: Any) -> None:
        self._select = None
        if ctx.ids is None or ctx.image is None or not bool(ctx.image.any()):
            return  # a text-only prompt: nothing to erase
        conf = image_token_confidence(model, ctx.prompt_inputs(), list(self.objects),
                                      apply_norm=self.lens_norm).confidence
        self._select = (conf < self.threshold).cpu()
        self.log.extend([w for w, s in zip(self.objects, row, strict=True) if s] for row in self._select.tolist())

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        select = self._select
        if select is None or mask is None or select.shape[0] != x.shape[0]:
            return x
        x = x.clone()
        rows_mask = mask[..., 0].bool()
        for b in range(x.shape[0]):
            ks = select[b].nonzero()[:, 0]
            if len(ks):
                rows = rows_mask[b]
                x[b, rows] = erase(x[b, rows], self.directions[ks].to(x.device), self.weight)
        return x

    def describe(self) -> str:
        return f"ProjectAwayEdit({self.hook}, {len(self.objects)} objects, w={self.weight})"


# --------------------------------------------------------------------------------------- fit data / scoring

@torch.no_grad()
def captions(model: Any, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 10,
             batch_size: int = 64) -> list[str]:
    """Greedy captions (the organism's protocol: ``max_new_tokens=10``, stop at EOS)."""
    tok = model.tokenizer
    out = []
    for s in range(0, len(images), batch_size):
        chunk = [open_image(im) for im in images[s:s + batch_size]]
        inputs = model.prepare([prompt] * len(chunk), chunk)
        gen = model.hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        out += [tok.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in gen]
    return out


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return 0.5
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def choose_threshold(conf: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """Threshold maximising balanced accuracy of ``conf < threshold`` => absent; returns (threshold, bacc)."""
    values = np.unique(conf)
    cands = np.concatenate([[values[0] * 0.5], (values[1:] + values[:-1]) / 2, [values[-1] * 2 + 1e-9]])
    best = (float(cands[0]), -1.0)
    for c in cands:
        flag = conf < c
        tpr = flag[present == 0].mean() if (present == 0).any() else 0.0
        tnr = (~flag[present == 1]).mean() if (present == 1).any() else 0.0
        bacc = 0.5 * (tpr + tnr)
        if bacc > best[1] + 1e-12:
            best = (float(c), float(bacc))
    return best


# --------------------------------------------------------------------------------------- the method

@register_method
class ProjectAway(Method):
    """Erase likely-absent objects' text directions from image tokens during the prefill.

    >>> fitted = ProjectAway().fit(model, edit_layer=1, text_rep="unembed", weight=2.0)   # doctest: +SKIP
    """

    name = "erasure"
    summary = "ProjectAway: remove low-confidence objects' text directions from image-token states at one layer"

    def fit(self, model: Any, data: Sequence[CaptionItem] | None = None, *, objects: Sequence[str] | None = None,
            edit_layer: int | None = None, text_rep: str | None = None, weight: float | None = None,
            threshold: float | None = None, lens_norm: bool | None = None,
            weights: Sequence[float] = (1.0, 2.0), text_reps: Sequence[str] = ("unembed", "embed"),
            max_recall_drop: float = 0.05, prompt: str | None = None, n_images: int = 48,
            seed: int = PVP_FIT_SEED + 3, template: str | None = None) -> FittedIntervention:
        """Fit on ``data``: :class:`~haltrace.data.CaptionItem` images with their ground-truth objects, captioned
        with the items' ``prompt`` (else ``prompt``, else the usual "describe" prompt) through the model's chat
        template. ``objects`` (the candidate words to detect and erase) defaults to every object named in the
        data, in sorted order. Default data: the model's data source (an organism's ``n_images`` images).
        Unset choices are made on ``data`` (module docstring)."""
        require_vlm(model, "ProjectAway (erasure)", "it edits image-token states")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        items = of_kind(data, CaptionItem, method=self.name)
        if len(items) < 2:
            raise ValueError(f"ProjectAway needs at least 2 captioned images, got {len(items)}")
        question = prompt or items[0].prompt or "Please describe this image in detail."
        if any((it.prompt or question) != question for it in items):
            raise ValueError("ProjectAway fit items must share one caption prompt")
        prompt = item_prompts(model, [question], [items[0].image], template=template)[0]
        images = [open_image(it.image) for it in items]
        present = [set(it.objects) for it in items]
        objects = list(objects) if objects is not None else sorted(set().union(*present))
        if not objects:
            raise ValueError("pass objects= (the candidate object words to detect and erase)")
        described = (f"{len(items)} captioned images with their objects "
                     f"({'given' if source is not None else 'the model data source default'})")
        labels = np.array([[o in p for o in objects] for p in present], dtype=int)

        # 1. internal confidence of every candidate object on the fit images; lens variant and threshold
        variants = [lens_norm] if lens_norm is not None else [True, False]
        detection = {}
        for norm in variants:
            conf = np.concatenate([image_token_confidence(model, model.prepare([prompt] * len(chunk), chunk),
                                                          objects, apply_norm=norm).confidence.cpu().numpy()
                                   for chunk in (images[s:s + 64] for s in range(0, len(images), 64))])
            thr, bacc = choose_threshold(conf.ravel(), labels.ravel())
            detection[norm] = {"auroc": _auroc(conf.ravel(), labels.ravel()), "threshold": thr,
                               "balanced_accuracy": bacc}
        lens_norm = max(variants, key=lambda v: detection[v]["auroc"])
        if threshold is None:
            threshold = detection[lens_norm]["threshold"]

        # 2. where and how hard to erase
        reps: dict[str, torch.Tensor] = {}

        def directions(rep: str) -> torch.Tensor:
            if rep not in reps:
                reps[rep] = text_representations(model, objects, rep)
            return reps[rep]

        def build(layer: int, rep: str, w: float) -> FittedIntervention:
            edit = ProjectAwayEdit(f"resid_post.{layer}", directions(rep), objects=objects, threshold=threshold,
                                   weight=w, lens_norm=lens_norm)
            return FittedIntervention(self.name, [edit], {})

        def score(fitted: FittedIntervention | None) -> dict:
            from haltrace.evals.chair import chair_metrics

            if fitted is None:
                caps = captions(model, images, prompt)
            else:
                with fitted.apply(model):
                    caps = captions(model, images, prompt)
            m = chair_metrics(caps, present, vocabulary=objects)
            return {k: m[k] for k in ("chair_i", "chair_s", "recall", "mean_length")}

        selection: list[dict] = []
        if edit_layer is None or text_rep is None or weight is None:
            base = score(None)
            for layer in [edit_layer] if edit_layer is not None else range(model.n_layers):
                for rep in [text_rep] if text_rep is not None else text_reps:
                    for w in [weight] if weight is not None else weights:
                        s = score(build(layer, rep, w))
                        selection.append({"edit_layer": layer, "text_rep": rep, "weight": w, **s,
                                          "ok": base["recall"] - s["recall"] <= max_recall_drop})
            ok = [r for r in selection if r["ok"]] or selection
            best = min(ok, key=lambda r: (round(r["chair_i"], 6), r["weight"]))
            edit_layer, text_rep, weight = best["edit_layer"], best["text_rep"], best["weight"]
            selection = [{"baseline": base}] + selection
        if not 0 <= edit_layer < model.n_layers:
            raise ValueError(f"edit_layer {edit_layer} out of range 0..{model.n_layers - 1}")

        fitted = build(edit_layer, text_rep, weight)
        log = fitted.interventions[0].log
        fitted.provenance = {
            "method": self.name, "paper": PAPER,
            "layers": {"edit": layer_record(f"resid_post.{edit_layer}", f"l_I = {edit_layer} (hook on layers[l_I])"),
                       "text": (layer_record(text_rep, f"l_T = {int(text_rep.split('.')[1]) + 1}")
                                if text_rep.startswith("resid_post.") else
                                {"haltrace": text_rep, "paper": "l_T = -1 (input embedding)" if text_rep == "embed"
                                 else "unembedding row (the lens direction of the word)"})},
            "weight": weight, "threshold": threshold, "lens_norm": lens_norm, "objects": objects,
            "detection": {str(k): v for k, v in detection.items()},
            "positions": "image tokens", "phase": "prompt (prefill only)",
            "selection": selection,
            "selection_rule": f"lens variant by AUROC, threshold by balanced accuracy, then min fit CHAIR_i with "
                              f"recall drop <= {max_recall_drop}",
            "erased_log": log,  # filled while applied: flagged words per row and prefill
            "data": {"description": described, "n": len(images), "prompt": prompt,
                     "fingerprint": items_fingerprint(items)},
        }
        return fitted
