"""VHR — Vision-aware Head Reinforcement (He et al., ACL 2025, arXiv 2412.13949).

Heads are scored by VHD, the L2 distance between a head's output (``head_out.l``, the input of ``o_proj``) at
the last prompt token with and without the image; heads whose output *surges* without the image (VHD and
text-only energy TA both above mean + std in their layer) are zeroed as outliers; the heads above the layer's
median VHD are scaled by ``alpha`` (paper: 2). Layers are processed in order with earlier layers already
reinforced, as in the paper's Algorithm 1 (see ``shared/research/methods-vlm.md`` §6).

Deviation (recorded in the provenance): the paper selects heads per sample at the first decoding step; here VHD
and TA are averaged over fit prompts and one fixed head set is applied with :class:`~haltrace.steering.ScaleHeads`
(the paper's "fixed heads" ablation; it is weaker than per-sample selection there). Layers: the paper uses the
second layer and the last 14 of 32 (``{1} ∪ [18, 32)``); we keep ``{1} ∪`` the last ``round(14/32 · N)``
layers, i.e. ``{1, 2, 3}`` for the 4-layer organism. ``head_out.l`` is block ``l``: paper index = haltrace index.

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> model = haltrace.load("shapes-llava")              # doctest: +SKIP
>>> fitted = get_method("vhr").fit(model)             # doctest: +SKIP
>>> fitted.interventions[0]                           # doctest: +SKIP
ScaleHeads(hook='head_out.1', ..., heads=[0, 3], factor=2.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from haltrace.data.items import CaptionItem, YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.steering.engine import ScaleHeads, steer
from haltrace.steering.fitdata import fingerprint, items_fingerprint, question_states, require_vlm
from haltrace.steering.registry import FittedIntervention, Method, register_method
from haltrace.steering.truthprint import FIT_SEED

PAPER = "He et al., Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence, ACL 2025"


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
    outliers: list[int] = []
    if outlier and vhd.numel() > 1:
        hit = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
        outliers = hit.nonzero().flatten().tolist()
        vhd[hit] = 0.0
    median = vhd.median() if vhd.numel() % 2 else vhd.sort().values[vhd.numel() // 2 - 1: vhd.numel() // 2 + 1].mean()
    return (vhd > median).nonzero().flatten().tolist(), outliers


@register_method
class VHR(Method):
    """Vision-aware head reinforcement: scale the most image-sensitive heads (VHD) by alpha."""

    name = "vhr"
    summary = "scale heads whose output changes most without the image (VHD, above-median per layer) by alpha=2"

    def fit(self, model: Any, data: Sequence[Any] | None = None, *, n_images: int = 100, seed: int = FIT_SEED,
            layers: Sequence[int] | None = None, alpha: float = 2.0, outlier: bool = True,
            caption_prompt: str = "Please describe this image in detail.", **kw: Any
            ) -> FittedIntervention:
        """Score heads on ``data``: :class:`~haltrace.data.CaptionItem` (asked with its ``prompt``, else
        ``caption_prompt``) and :class:`~haltrace.data.YesNoQuestion` items, every one with an image (default: the
        model's data source, e.g. an organism's caption prompts + yes/no questions)."""
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        require_vlm(model, "VHR (vhr)", "it compares head outputs with and without the image")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        prompts = of_kind(data, CaptionItem, YesNoQuestion, method=self.name)
        prompts = [CaptionItem(p.image, p.objects, p.image_id, p.prompt or caption_prompt)
                   if isinstance(p, CaptionItem) else p for p in prompts]
        if any(p.image is None for p in prompts):
            raise ValueError("VHR fit data: every item must carry an image (VHR compares heads with and without it)")
        layers = sorted(set(default_layers(model.n_layers) if layers is None else (int(x) for x in layers)))
        bad = [x for x in layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has layers 0..{model.n_layers - 1}")
        chosen: list[ScaleHeads] = []
        report: dict[str, Any] = {}
        for layer in layers:  # layer by layer: earlier layers already reinforced (Algorithm 1)
            hook = f"head_out.{layer}"
            with steer(model, *chosen) if chosen else _null():
                _, with_img = question_states(model, prompts, [hook])
                _, without = question_states(model, prompts, [hook], drop_image=True)
            a, b = with_img[hook], without[hook]  # [N, H, head_dim]
            vhd = (a - b).norm(dim=-1).mean(0)
            ta = (b ** 2).sum(-1).mean(0)
            heads, outliers = select_heads(vhd, ta, outlier=outlier)
            report[hook] = {"vhd": vhd.tolist(), "ta": ta.tolist(), "selected": heads, "outliers": outliers}
            if heads:
                chosen.append(ScaleHeads(hook, heads=heads, factor=alpha, positions="all", phase="both"))
        if not chosen:
            raise ValueError("no head passed the selection in any layer (all VHD equal?)")
        spec = {"layers": layers, "alpha": alpha, "outlier": outlier, "n": len(prompts), "seed": seed}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "layers": {"haltrace": [f"head_out.{x}" for x in layers], "paper_index": layers,
                       "paper_default": "{1} ∪ [L-14, L) for 32-layer LLaVA-1.5; here {1} ∪ last round(14/32*L)"},
            "alpha": alpha, "outlier_removal": outlier,
            "heads": {k: v["selected"] for k, v in report.items()},
            "scores": report,
            "positions": "all", "phase": "both",
            "deviation": ("heads fixed from fit-set mean VHD (paper: per sample at step 0); VHD at the last prompt "
                          "token with vs without the image tokens"),
            "data": {"description": "caption prompts + yes/no questions, each with its image",
                     "n_prompts": len(prompts), "seed": seed, "fingerprint": items_fingerprint(prompts),
                     "source": "given" if source is not None else "default (model's data source)"},
            "fingerprint": fingerprint(*(torch.tensor(v["vhd"]) for v in report.values()), spec=spec),
        }
        return FittedIntervention(self.name, chosen, provenance)


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()
