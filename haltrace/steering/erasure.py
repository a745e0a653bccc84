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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from haltrace.data.images import open_image
from haltrace.data.items import CaptionItem, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.models.adapters.base import cached_length, first_tensor
from haltrace.steering.fitdata import (
    item_prompts,
    items_fingerprint,
    last_token_states,
    layer_record,
    require_vlm,
)
from haltrace.steering.pvp import FIT_SEED
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.trace.capture import temporary_hooks
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


#: forward kwargs that are NOT part of the prompt and its image: the KV cache, and the flags ``generate`` sets
#: for its own step (an extra forward is a plain no-cache forward that returns everything). Every other kwarg
#: is carried: the mask, position ids (Qwen2-VL's M-RoPE ``[4, B, L]``), ``pixel_values`` with whatever the
#: family needs beside it (``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``image_sizes``, ...)
#: or, from transformers 5 ``generate``, the precomputed ``mm_encoder_outputs``.
NOT_FORWARDED_KEYS = frozenset({
    "input_ids", "inputs_embeds", "cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep",
    "num_logits_to_keep", "return_dict", "output_attentions", "output_hidden_states", "labels",
})


def image_forward_inputs(ids: torch.Tensor, kwargs: dict) -> dict:
    """Inputs for an extra no-cache forward over the same prompt (and image) as the intercepted call: ``ids``
    plus every model input of ``kwargs`` except the cache and generation flags (:data:`NOT_FORWARDED_KEYS`)."""
    inputs = {"input_ids": ids}
    inputs.update({k: v for k, v in kwargs.items() if k not in NOT_FORWARDED_KEYS and v is not None})
    return inputs


def erasure_hooks(directions: torch.Tensor, words: Sequence[str], threshold: float, edit_layer: int,
                  weight: float, *, lens_norm: bool = True, log: list | None = None):
    """``hooks(model)`` context manager: per prefill, flag objects with ``c_o < threshold`` for each row and
    erase them from that row's image tokens at ``resid_post.edit_layer``. ``log`` (a list) receives the
    flagged words per row. Hooks are always removed (``temporary_hooks``)."""
    if not bool(torch.isfinite(directions).all()):
        raise ValueError("the erasure directions contain NaN or inf (from a damaged saved fit? refit ProjectAway)")

    @contextmanager
    def install(model: Any) -> Iterator[None]:
        if not 0 <= edit_layer < model.n_layers:
            raise ValueError(f"edit_layer {edit_layer} out of range 0..{model.n_layers - 1}")
        if directions.shape != (len(words), model.hidden_size):
            raise ValueError(f"erasure directions are {tuple(directions.shape)} but need one row of the model's "
                             f"hidden size per object: ({len(words)}, {model.hidden_size})")
        state: dict[str, Any] = {"busy": False, "select": None, "image": None}

        def on_forward(_m: Any, args: tuple, kwargs: dict) -> None:
            if state["busy"]:  # our own detection forward
                return
            state["select"] = None
            if cached_length(kwargs) > 0:  # a decoding step, even one that emitted the image token
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            image = model.image_token_mask(ids)
            if not bool(image.any()):  # decoding steps carry no image tokens
                return
            inputs = image_forward_inputs(ids, kwargs)
            state["busy"] = True
            try:
                conf = image_token_confidence(model, inputs, list(words), apply_norm=lens_norm).confidence
            finally:
                state["busy"] = False
            state["select"], state["image"] = (conf < threshold).cpu(), image
            if log is not None:
                log.extend([w for w, s in zip(words, row, strict=True) if s] for row in state["select"].tolist())

        def edit(_m: Any, _a: tuple, _kw: dict, out: Any) -> Any:
            select, image = state["select"], state["image"]
            if state["busy"] or select is None:
                return None
            h = first_tensor(out)
            if h.shape[1] != image.shape[1]:  # not the prefill this selection was made for
                return None
            h = h.clone()
            for b in range(h.shape[0]):
                ks = select[b].nonzero()[:, 0]
                if len(ks):
                    rows = image[b].to(h.device)
                    h[b, rows] = erase(h[b, rows], directions[ks].to(h.device), weight)
            return h if isinstance(out, torch.Tensor) else (h, *tuple(out)[1:])

        with temporary_hooks(forward=[(model.adapter.layers[edit_layer], edit)], pre=[(model.hf, on_forward)],
                             with_kwargs=True):
            yield

    return install


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
            seed: int = FIT_SEED + 3, template: str | None = None) -> FittedIntervention:
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

        def build(layer: int, rep: str, w: float, log: list | None = None) -> FittedIntervention:
            hooks = erasure_hooks(directions(rep), objects, threshold, layer, w, lens_norm=lens_norm, log=log)
            return FittedIntervention(self.name, [], {}, hooks=hooks)

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

        log: list = []
        fitted = build(edit_layer, text_rep, weight, log)
        fitted.state = {"directions": directions(text_rep), "objects": objects, "threshold": threshold,
                        "edit_layer": edit_layer, "weight": weight, "lens_norm": lens_norm}
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

    def restore(self, state: dict[str, Any]) -> FittedIntervention:
        """The detection + erasure hooks of a saved fit (text directions, objects, threshold, layer, weight).
        The flagged words go to ``provenance["erased_log"]`` as in a fresh fit."""
        log: list = []
        hooks = erasure_hooks(torch.as_tensor(state["directions"], dtype=torch.float32), list(state["objects"]),
                              float(state["threshold"]), int(state["edit_layer"]), float(state["weight"]),
                              lens_norm=bool(state["lens_norm"]), log=log)
        return FittedIntervention(self.name, [], {"erased_log": log}, hooks=hooks, state=dict(state))
