"""VHR — Vision-aware Head Reinforcement (He et al., ACL 2025, arXiv 2412.13949).

Heads are scored by VHD, the L2 distance between a head's output (``head_out.l``, the input of ``o_proj``) at
the last prompt token with and without the image; heads whose output *surges* without the image (VHD and
text-only energy TA both above mean + std in their layer) are zeroed as outliers; the heads above the layer's
median VHD are scaled by ``alpha`` (paper: 2). Layers are processed in order with earlier layers already
reinforced, as in the paper's Algorithm 1 (see ``shared/research/methods-vlm.md`` §6).

``heads="sample"`` (default, the paper's method): :class:`VisionAwareHeads` selects each prompt's heads at its
prefill, per batch row. :meth:`VisionAwareHeads.prepare` runs the prompt with its image and without its image
tokens, truncated forwards that stop at the next layer still to select, alternating the two branches
(:func:`sample_head_scales`): a layer's VHD always sees the earlier layers reinforced with that row's own heads
(the paper's layer-by-layer coupling), in ``len(layers) + 1`` truncated forwards. The heads stay fixed for the
whole generation (the paper keeps them for every later step). ``heads="fixed"``: one head set from the fit set's
mean VHD for every prompt (:class:`~haltrace.steering.ScaleHeads`; the paper's "fixed heads" ablation, which
keeps about a third of the CHAIR_S gain there).

Layers: the paper uses the second layer and the last 14 of 32 (``{1} ∪ [18, 32)``); on other depths haltrace keeps
``{1} ∪`` the last ``round(14/32 · N)`` layers, i.e. ``{1, 2, 3}`` for the 4-layer organism. ``head_out.l`` is
block ``l``: paper index = haltrace index.

Fidelity (paper step -> haltrace -> same or different; no official code is public, the paper is the reference):

=============================================  ===========================  =========================================
VHD = ||A_li(with image) - A_li(no image)||,   ``sample_head_scales``       same: o_proj input per head, last prompt
pre-W^O, at the first generation step                                       token; "no image" = the image tokens
                                                                            (and their delimiters) removed
outlier: VHD and TA both > mean + std -> 0     ``select_heads``             same
heads with VHD > layer median, x alpha         ``select_heads``,            same (``alpha=2``)
                                               ``VisionAwareHeads``
layer by layer, earlier layers reinforced      ``sample_head_scales``       same (truncated forwards instead of one
                                                                            synchronous two-branch pass)
per sample, fixed for the rest of decoding     ``VisionAwareHeads``         same (``heads="fixed"``: the ablation)
reinforced at every position                   ``VisionAwareHeads``         same (prompt and generated tokens)
layers {1} ∪ [18, 32) of 32                    ``default_layers``           same on 32 layers; rescaled otherwise
=============================================  ===========================  =========================================

``preset="paper"``: ``heads="sample"``, ``alpha=2``, outlier removal, the paper's layers; options given
explicitly win and are listed in ``provenance["deviations"]``.

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")              # doctest: +SKIP
>>> fitted = get_method("vhr").fit(model)             # doctest: +SKIP
>>> fitted.interventions[0]                           # doctest: +SKIP
VisionAwareHeads(hook='head_out.1', ..., layers=[1, 2, 3], alpha=2.0, outlier=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from haltrace.data.items import CaptionItem, YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.errors import InputError
from haltrace.steering.engine import Intervention, ScaleHeads, register_state_type, steer
from haltrace.steering.fitdata import (
    TRUTHPRINT_FIT_SEED,
    fingerprint,
    item_prompts,
    items_fingerprint,
    question_states,
    require_vlm,
)
from haltrace.steering.interventions import check_finite
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = "He et al., Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence, ACL 2025"
PRESETS = ("paper",)
HEAD_MODES = ("sample", "fixed")
PAPER_ALPHA = 2.0
#: config keys of the tokens that open / close an image (Qwen2-VL's vision_start / vision_end, Gemma 3's
#: boi / eoi): dropped with the image tokens, so the text-only branch is the prompt as written without an image
IMAGE_DELIMITER_KEYS = ("vision_start_token_id", "vision_end_token_id", "boi_token_index", "eoi_token_index",
                        "boi_token_id", "eoi_token_id")


def default_layers(n_layers: int) -> list[int]:
    """The paper's ``{1} ∪ last 14 of 32`` rescaled to ``n_layers`` blocks."""
    tail = max(1, round(14 / 32 * n_layers))
    return sorted({min(1, n_layers - 1)} | set(range(n_layers - tail, n_layers)))


def select_heads(vhd: torch.Tensor, ta: torch.Tensor, *, outlier: bool = True) -> tuple[list[int], list[int]]:
    """One layer: zero outliers (VHD and TA both > mean + std), keep heads with VHD > median.

    Returns (selected heads, outlier heads).

    >>> select_heads(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4))
    ([2, 3], [])
    """
    vhd = vhd.clone().float()
    ta = ta.float()
    outliers: list[int] = []
    if outlier and vhd.numel() > 1:
        hit = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
        outliers = hit.nonzero().flatten().tolist()
        vhd[hit] = 0.0
    median = vhd.median() if vhd.numel() % 2 else vhd.sort().values[vhd.numel() // 2 - 1: vhd.numel() // 2 + 1].mean()
    return (vhd > median).nonzero().flatten().tolist(), outliers


# --------------------------------------------------------------------------------------- per-sample selection

class _Stop(Exception):
    """Ends a truncated forward once the layer it was run for is recorded."""


def _image_delimiters(model: Any) -> list[int]:
    ids = []
    for cfg in (model.adapter.config, getattr(model.hf, "config", None)):
        for key in IMAGE_DELIMITER_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return ids


def text_only_rows(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real prompt tokens without its image tokens and image delimiters (VHR's ``x_T``)."""
    keep = ~image.to(ids.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        keep &= attention_mask.to(ids.device).bool()
    for token in _image_delimiters(model):
        keep &= ids != token
    return [ids[b][keep[b]] for b in range(ids.shape[0])]


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H * hd]`` with head ``h`` of row ``b`` times ``scale[b, h]``."""
    batch, seq, width = x.shape
    n_heads = scale.shape[-1]
    view = x.view(batch, seq, n_heads, width // n_heads) * scale.to(x.dtype)[:, None, :, None]
    return view.view(batch, seq, width)


@torch.no_grad()
def sample_head_scales(model: Any, inputs: dict[str, Any], image: torch.Tensor, last: torch.Tensor,
                       layers: Sequence[int], alpha: float, *, outlier: bool = True) -> dict[str, Any]:
    """VHR's per-sample selection (Algorithm 1) for one batch of prompts.

    ``inputs``: the prompts' model inputs with their images (``input_ids`` ``[B, T]``, the attention mask, pixel
    values...); ``image`` ``[B, T]`` their image-token mask; ``last`` ``[B]`` each row's last real prompt token.
    For every layer of ``layers`` in order, each row's VHD and TA are taken at its last prompt token from the
    prompt with its image and from the same prompt without its image tokens (:func:`text_only_rows`, rows of
    equal length batched, never padded), with that row's heads of the earlier layers already scaled; the heads
    :func:`select_heads` keeps get ``alpha``. The two branches alternate truncated forwards: each stops at the
    first layer the other branch has not reached, and a branch that finds the other's record there selects that
    layer and goes on, so the selection costs ``len(layers) + 1`` truncated forwards (plus one per extra
    text-only length group).

    Returns ``{"scales": {layer: [B, H] float32}, "heads": {layer: [[head, ...] per row]},
    "outliers": {layer: [[...] per row]}, "vhd": {layer: [B, H]}, "ta": {layer: [B, H]}, "has_image": [B] bool}``;
    rows without image tokens keep scale 1 and empty head lists.
    """
    layers = sorted(int(x) for x in layers)
    ids = inputs["input_ids"]
    batch, n_heads, head_dim = ids.shape[0], model.n_heads, model.head_dim
    has_image = image.to(ids.device).any(1)
    device = ids.device
    scales = {layer: torch.ones(batch, n_heads, device=device) for layer in layers}
    done = {layer: ~has_image.clone() for layer in layers}
    out: dict[str, Any] = {"scales": scales, "heads": {x: [[] for _ in range(batch)] for x in layers},
                           "outliers": {x: [[] for _ in range(batch)] for x in layers},
                           "vhd": {x: torch.zeros(batch, n_heads) for x in layers},
                           "ta": {x: torch.zeros(batch, n_heads) for x in layers},
                           "has_image": has_image.cpu()}
    if not bool(has_image.any()):
        return out
    records = {b: {x: torch.zeros(batch, n_heads, head_dim, device=device) for x in layers}
               for b in ("image", "text")}
    filled = {b: {x: torch.zeros(batch, dtype=torch.bool, device=device) for x in layers} for b in ("image", "text")}

    def select(layer: int, rows: torch.Tensor) -> None:
        a, b = records["image"][layer][rows], records["text"][layer][rows]
        vhd, ta = (a - b).norm(dim=-1), (b ** 2).sum(-1)
        for i, row in enumerate(rows.tolist()):
            heads, outliers = select_heads(vhd[i], ta[i], outlier=outlier)
            out["heads"][layer][row], out["outliers"][layer][row] = heads, outliers
            out["vhd"][layer][row], out["ta"][layer][row] = vhd[i].cpu(), ta[i].cpu()
            if heads:
                scales[layer][row, heads] = float(alpha)
        done[layer][rows] = True

    def run(branch: str, forward: dict[str, Any], rows: torch.Tensor, last_index: torch.Tensor) -> None:
        other = "text" if branch == "image" else "image"
        need = rows[has_image[rows]]  # the rows whose heads are selected (rows with an image)
        at = torch.arange(len(rows), device=device)

        def hook_for(layer: int) -> Any:
            def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
                x = args[0] if args else kwargs["hidden_states"]
                if not bool(done[layer][need].all()):
                    records[branch][layer][rows] = x[at, last_index].float().view(len(rows), n_heads, head_dim)
                    filled[branch][layer][rows] = True
                    if not bool(filled[other][layer][need].all()):
                        raise _Stop  # the other branch has not reached this layer yet
                    select(layer, need)
                if layer == layers[-1]:
                    raise _Stop  # every layer selected: the rest of this forward is not needed
                y = _scaled(x, scales[layer][rows])
                return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
            return pre

        handles = [model.adapter.o_proj(layer).register_forward_pre_hook(hook_for(layer), with_kwargs=True)
                   for layer in layers]
        try:
            model.hf(**forward, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    rows_all = torch.arange(batch, device=device)
    text = text_only_rows(model, ids, inputs.get("attention_mask"), image)
    groups: dict[int, list[int]] = {}
    for row in has_image.nonzero().flatten().tolist():
        groups.setdefault(int(text[row].shape[0]), []).append(row)
    if any(n == 0 for n in groups):
        raise ValueError("VHR: a prompt holds nothing but its image; the text-only branch needs some text")
    for step in range(2 * len(layers) + 2):
        if all(bool(done[x].all()) for x in layers):
            break
        if step % 2 == 0:
            run("image", inputs, rows_all, last.to(device))
        else:
            for n, rows in groups.items():
                chunk = torch.stack([text[r] for r in rows])
                forward = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
                run("text", forward, torch.tensor(rows, device=device), torch.full((len(rows),), n - 1,
                                                                                  device=device))
    else:
        raise RuntimeError("VHR's per-sample selection did not finish (a layer never reached?)")
    return out


@register_state_type
@dataclass
class VisionAwareHeads(Intervention):
    """VHR at ``head_out.L`` (``L`` one of ``layers``): at each new prompt (:meth:`prepare`, its prefill) every
    row's vision-aware heads are selected by :func:`sample_head_scales` over all of ``layers`` (computed once per
    prompt and shared by the fit's interventions); this layer's selected heads are scaled by ``alpha`` in that
    row, at every position of the prefill and of the generation. A row without image tokens is left alone.

    ``last_heads`` (runtime): this layer's selected heads per row of the latest prompt.
    """

    layers: list[int] = field(default_factory=list)
    alpha: float = PAPER_ALPHA
    outlier: bool = True
    prepares = True
    last_heads: list[list[int]] = field(default_factory=list, init=False, repr=False)
    _scale: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = sorted({int(x) for x in self.layers})
        check_finite("alpha", float(self.alpha))
        self.alpha, self.outlier = float(self.alpha), bool(self.outlier)
        kind, _, index = str(self.hook).partition(".")
        if kind != "head_out" or not index.lstrip("-").isdigit():
            raise ValueError(f"VisionAwareHeads works on head_out.<layer>, got {self.hook!r}")
        if int(index) not in self.layers:
            raise ValueError(f"VisionAwareHeads at {self.hook}: layer {index} is not among the reinforced layers "
                             f"{self.layers}")

    @property
    def layer(self) -> int:
        return int(str(self.hook).partition(".")[2])

    def validate(self, model: Any) -> Any:
        point = super().validate(model)
        if point.kind != "head_out":
            raise ValueError(f"VisionAwareHeads works on head_out.<layer>, got {point.name!r}")
        bad = [x for x in self.layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"VHR layers {bad} out of range: the model has layers 0..{model.n_layers - 1}")
        if not model.is_vlm:
            raise ValueError("VHR needs a vision-language model (it compares heads with and without the image)")
        return point

    def prepare(self, model: Any, ctx: Any) -> None:
        key = (ctx.serial, tuple(self.layers), self.alpha, self.outlier)
        memo = ctx.__dict__.setdefault("_vhr_selection", {})
        if memo.get("key") != key:
            if ctx.ids is None:
                raise RuntimeError("VHR selects heads from the prompt's token ids: call the model with input_ids, "
                                   "not inputs_embeds")
            image = ctx.image if ctx.image is not None else torch.zeros_like(ctx.ids, dtype=torch.bool)
            result = sample_head_scales(model, ctx.prompt_inputs(), image, ctx.last_prompt, self.layers,
                                        self.alpha, outlier=self.outlier)
            memo.clear()
            memo.update(key=key, result=result)
        result = memo["result"]
        self.last_heads = result["heads"][self.layer]
        self._scale = result["scales"][self.layer] if bool(result["has_image"].any()) else None

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        scale = self._scale
        if scale is None:
            return x
        if scale.shape[0] != x.shape[0]:
            raise ValueError(f"VHR selected heads for {scale.shape[0]} rows but this forward has {x.shape[0]}; "
                             "the batch changed after the prompt (beams or batch growth are not supported)")
        y = _scaled(x, scale.to(x.device))
        return y if mask is None else torch.where(mask.bool(), y, x)

    def describe(self) -> str:
        return f"VisionAwareHeads({self.hook}, alpha={self.alpha}, per sample over layers {self.layers})"


def _prompt_batches(model: Any, items: Sequence[Any], batch_size: int = 64) -> list[tuple[list[int], dict]]:
    """Items as model inputs with their images, grouped by token length (no padding)."""
    questions = [getattr(it, "question", None) or getattr(it, "prompt", None) for it in items]
    images = [it.image for it in items]
    prompts = item_prompts(model, questions, images)
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    from haltrace.data.images import open_image

    out = []
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            out.append((chunk, model.prepare([prompts[i] for i in chunk], [open_image(images[i]) for i in chunk])))
    return out


def per_sample_selection(model: Any, items: Sequence[Any], layers: Sequence[int], alpha: float, *,
                         outlier: bool = True) -> dict[str, Any]:
    """:func:`sample_head_scales` over fit items: each item's heads per layer (``{layer: [[heads] per item]}``)."""
    heads: dict[int, list[Any]] = {int(x): [None] * len(items) for x in layers}
    for idx, inputs in _prompt_batches(model, items):
        ids = inputs["input_ids"]
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)
        res = sample_head_scales(model, inputs, model.image_token_mask(ids), last, layers, alpha, outlier=outlier)
        for layer in heads:
            for j, i in enumerate(idx):
                heads[layer][i] = res["heads"][layer][j]
    return heads


def selection_summary(per_item: dict[int, list[list[int]]], fixed: dict[int, list[int]] | None,
                      n_heads: int) -> dict[str, Any]:
    """How much the per-sample head sets vary: per layer, how often each head is picked, the number of distinct
    sets, and (given the fixed-mode sets) their mean Jaccard overlap with the fixed set."""
    out: dict[str, Any] = {}
    for layer, rows in per_item.items():
        freq = [sum(h in r for r in rows) / max(1, len(rows)) for h in range(n_heads)]
        entry: dict[str, Any] = {"pick_rate_by_head": [round(f, 4) for f in freq],
                                 "distinct_sets": len({tuple(r) for r in rows}), "n": len(rows)}
        if fixed is not None:
            ref = set(fixed.get(layer, []))
            jac = [len(ref & set(r)) / len(ref | set(r)) if ref | set(r) else 1.0 for r in rows]
            entry["mean_jaccard_with_fixed"] = round(sum(jac) / max(1, len(jac)), 4)
        out[f"head_out.{layer}"] = entry
    return out


# --------------------------------------------------------------------------------------- the method

@register_method
class VHR(Method):
    """Vision-aware head reinforcement: scale the most image-sensitive heads (VHD) by alpha, per sample."""

    name = "vhr"
    summary = ("per prompt, scale the heads whose output changes most without the image (VHD, above-median per "
               "layer, layer by layer) by alpha=2")

    def fit(self, model: Any, data: Sequence[Any] | None = None, *, heads: str | None = None, n_images: int = 100,
            seed: int = TRUTHPRINT_FIT_SEED, layers: Sequence[int] | None = None, alpha: float | None = None,
            outlier: bool = True, caption_prompt: str = "Please describe this image in detail.",
            preset: str | None = None, **kw: Any) -> FittedIntervention:
        """VHR on ``model``.

        ``heads="sample"`` (default): each prompt's heads are selected at its prefill (:class:`VisionAwareHeads`);
        ``data`` is then optional and, when there is some (given, or the model's data source), only measures how
        the per-sample head sets vary over it (``provenance["per_sample_selection"]``). ``heads="fixed"``: one head
        set from the mean VHD over ``data`` (:class:`~haltrace.data.CaptionItem`, asked with its ``prompt``, else
        ``caption_prompt``, and :class:`~haltrace.data.YesNoQuestion` items, each with an image; default: the
        model's data source, e.g. an organism's caption prompts + yes/no questions; a user's ``--fit-data``).
        ``preset="paper"``: per-sample heads, ``alpha=2``, outlier removal, the paper's layers (explicit options
        win and are listed as deviations).
        """
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown VHR preset {preset!r}; the only preset is 'paper'")
        explicit = {"heads": heads, "alpha": alpha, "layers": layers, "outlier": None if outlier else outlier}
        heads = "sample" if heads is None else str(heads)
        if heads not in HEAD_MODES:
            raise InputError(f"--opt heads={heads!r}: VHR selects heads per sample ('sample', the paper) or once "
                             "from the fit set ('fixed')")
        alpha = PAPER_ALPHA if alpha is None else float(alpha)
        require_vlm(model, "VHR (vhr)", "it compares head outputs with and without the image")
        layers = sorted(set(default_layers(model.n_layers) if layers is None else (int(x) for x in layers)))
        bad = [x for x in layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has layers 0..{model.n_layers - 1}")
        source = data
        if data is None:
            try:
                data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
            except ValueError:
                if heads == "fixed":
                    raise
                data = None  # per-sample VHR learns nothing from data: a real model without fit data is fine
        prompts = self._prompts(data, caption_prompt) if data is not None else []
        if heads == "fixed" and not prompts:
            raise ValueError("VHR heads='fixed' needs fit data: caption prompts or yes/no questions with images")
        fixed_heads, report = self._fixed(model, prompts, layers, alpha, outlier) if prompts else ({}, {})
        if heads == "fixed":
            interventions: list[Intervention] = [
                ScaleHeads(f"head_out.{layer}", heads=h, factor=alpha, positions="all", phase="both")
                for layer, h in fixed_heads.items() if h]
            if not interventions:
                raise ValueError("no head passed the selection in any layer (all VHD equal?)")
        else:
            interventions = [VisionAwareHeads(f"head_out.{layer}", layers=layers, alpha=alpha, outlier=outlier)
                             for layer in layers]
        per_sample = None
        if heads == "sample" and prompts:
            per_sample = selection_summary(per_sample_selection(model, prompts, layers, alpha, outlier=outlier),
                                           fixed_heads, model.n_heads)
        spec = {"layers": layers, "alpha": alpha, "outlier": outlier, "n": len(prompts), "seed": seed,
                "heads": heads}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "preset": preset,
            "heads_mode": heads,
            "deviations": self._deviations(model, heads, layers, alpha, outlier, preset, explicit),
            "layers": {"haltrace": [f"head_out.{x}" for x in layers], "paper_index": layers,
                       "paper_default": "{1} ∪ [L-14, L) for 32-layer LLaVA-1.5; here {1} ∪ last round(14/32*L)"},
            "alpha": alpha, "outlier_removal": outlier,
            "positions": "all", "phase": "both",
            "selection": ("per sample: each prompt's heads at its prefill, layer by layer (VisionAwareHeads)"
                          if heads == "sample" else "fixed: one head set from the fit set's mean VHD"),
            "heads": ({k: v["selected"] for k, v in report.items()} if heads == "fixed"
                      else "per prompt (see per_sample_selection for how they vary on the fit data)"),
            "fixed_heads_on_fit_data": {k: v["selected"] for k, v in report.items()},
            "per_sample_selection": per_sample,
            "scores": report,
            "vhd_position": "last prompt token, with vs without the image tokens (and their delimiters)",
            "data": ({"description": "caption prompts + yes/no questions, each with its image",
                      "n_prompts": len(prompts), "seed": seed, "fingerprint": items_fingerprint(prompts),
                      "source": "given" if source is not None else "default (model's data source)",
                      "used_for": ("the fixed head set" if heads == "fixed"
                                   else "diagnostics only (per-sample heads need no fit data)")}
                     if prompts else {"description": "none: per-sample VHR needs no fit data", "n_prompts": 0}),
            "fingerprint": fingerprint(*(torch.tensor(v["vhd"]) for v in report.values()), spec=spec),
        }
        return FittedIntervention(self.name, interventions, provenance)

    # ------------------------------------------------------------------------------------------------ parts
    def _prompts(self, data: Sequence[Any], caption_prompt: str) -> list[Any]:
        prompts = of_kind(data, CaptionItem, YesNoQuestion, method=self.name)
        prompts = [CaptionItem(p.image, p.objects, p.image_id, p.prompt or caption_prompt)
                   if isinstance(p, CaptionItem) else p for p in prompts]
        if any(p.image is None for p in prompts):
            raise ValueError("VHR fit data: every item must carry an image (VHR compares heads with and without it)")
        return prompts

    @staticmethod
    def _fixed(model: Any, prompts: list[Any], layers: list[int], alpha: float, outlier: bool
               ) -> tuple[dict[int, list[int]], dict[str, Any]]:
        """The fixed-mode head sets: mean VHD / TA over the fit prompts, layer by layer (earlier layers scaled)."""
        chosen: list[ScaleHeads] = []
        heads: dict[int, list[int]] = {}
        report: dict[str, Any] = {}
        for layer in layers:  # layer by layer: earlier layers already reinforced (Algorithm 1)
            hook = f"head_out.{layer}"
            with steer(model, *chosen) if chosen else _null():
                _, with_img = question_states(model, prompts, [hook])
                _, without = question_states(model, prompts, [hook], drop_image=True)
            a, b = with_img[hook], without[hook]  # [N, H, head_dim]
            vhd = (a - b).norm(dim=-1).mean(0)
            ta = (b ** 2).sum(-1).mean(0)
            selected, outliers = select_heads(vhd, ta, outlier=outlier)
            report[hook] = {"vhd": vhd.tolist(), "ta": ta.tolist(), "selected": selected, "outliers": outliers}
            heads[layer] = selected
            if selected:
                chosen.append(ScaleHeads(hook, heads=selected, factor=alpha, positions="all", phase="both"))
        return heads, report

    @staticmethod
    def _deviations(model: Any, heads: str, layers: list[int], alpha: float, outlier: bool, preset: str | None,
                    explicit: dict[str, Any]) -> list[str]:
        out = []
        if heads == "fixed":
            out.append("heads='fixed': one head set from the fit set's mean VHD for every prompt (the paper selects "
                       "per sample; its fixed-heads ablation keeps about a third of the CHAIR_S gain)")
        if alpha != PAPER_ALPHA:
            out.append(f"alpha={alpha:g} (paper: {PAPER_ALPHA:g})")
        if not outlier:
            out.append("outlier removal off (the paper's ablation without it is weaker)")
        if layers != default_layers(model.n_layers):
            out.append(f"layers {layers} (paper: {{1}} ∪ the last 14 of 32, here {default_layers(model.n_layers)})")
        elif model.n_layers != 32:
            out.append(f"layers {layers}: the paper's {{1}} ∪ [18, 32) of 32 rescaled to {model.n_layers} layers")
        out.append("the text-only branch removes the image tokens (and their delimiter tokens) from the prompt; the "
                   "paper does not say how its no-image input is built")
        out.append("the layer-by-layer coupling runs as truncated forwards alternating the two branches "
                   f"({len(layers) + 1} per prompt, not one synchronous pass): same heads, more compute")
        if preset == "paper":
            given = sorted(k for k, v in explicit.items() if v is not None)
            if given:
                out.append(f"preset='paper' with explicit {', '.join(given)}, which override the paper's values")
        return out


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()
