"""Prior vs pixel across layers: for counterfactual items (a blue strawberry), the logit-lens rank of the
prior colour ("red") and of the pixel colour ("blue") at the last prompt token, layer by layer.

This is the measurement behind ``haltrace lens --task counterfactual-color`` and the demo report. Items are
duck-typed: anything with ``full_prompt``, ``image`` (HxWx3 uint8) and ``meta["prior"]`` / ``meta["pixel"]``
(such as the rows of the organism's ``counterfactual_colour_set``, which ``haltrace lens`` passes in: the
trace layer never imports the organism).

>>> import haltrace
>>> model = haltrace.load("shapes-llava")                                               # doctest: +SKIP
>>> items = counterfactual_colour_set(world, n_images=64)  # the organism's (haltrace.organism.tasks)  # doctest: +SKIP
>>> report = prior_pixel_lens(model, items, world.config.colours)                       # doctest: +SKIP
>>> report["prior_leads_by_layer"][0] > report["prior_leads_by_layer"][-1]              # doctest: +SKIP
True

Any duck-typed items do (here on a tiny random model):

>>> from types import SimpleNamespace
>>> import numpy as np
>>> items = [SimpleNamespace(full_prompt="<image> what color is the circle ? answer :", meta={"prior": "red",
...          "pixel": "blue"}, image=np.zeros((28, 28, 3), dtype=np.uint8))]
>>> report = prior_pixel_lens(model, items, ["red", "blue", "green"])
>>> report["n"], len(report["prior_leads_by_layer"]) == model.n_layers
(1, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def prior_pixel_lens(model: Any, items: Sequence[Any], colours: Sequence[str], *, batch_size: int = 16,
                     apply_norm: bool = True, on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per layer (``resid_post.i``): the share of items whose prior colour outranks the pixel colour, the mean
    rank of each (0 = top-1 among the whole vocabulary), and the share where each is top-1."""
    from PIL import Image

    from haltrace.trace.lens import logit_lens

    if not items:
        raise ValueError("prior_pixel_lens needs at least one counterfactual item")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    colours = list(colours)
    index = {c: i for i, c in enumerate(colours)}
    missing = sorted({w for ex in items for w in (ex.meta["prior"], ex.meta["pixel"]) if w not in index})
    if missing:
        raise ValueError(f"colours {missing} of the items are not among the candidate colours {colours}")
    prior_ranks, pixel_ranks, layers = [], [], None
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        inputs = model.prepare([ex.full_prompt for ex in batch], images=[Image.fromarray(ex.image) for ex in batch])
        res = logit_lens(model, inputs, colours, positions="last", top_k=0, apply_norm=apply_norm)
        ranks = res.target_ranks[:, :, 0, :]  # [L, B, C]
        rows = torch.arange(len(batch))
        prior_ranks.append(ranks[:, rows, [index[ex.meta["prior"]] for ex in batch]])
        pixel_ranks.append(ranks[:, rows, [index[ex.meta["pixel"]] for ex in batch]])
        layers = res.layers
        if on_batch is not None:
            on_batch(len(batch))
    prior = torch.cat(prior_ranks, 1).double()  # [L, n]
    pixel = torch.cat(pixel_ranks, 1).double()
    return {
        "n": len(items), "layers": layers, "apply_norm": apply_norm,
        "prior_leads_by_layer": (prior < pixel).double().mean(1).tolist(),
        "prior_mean_rank_by_layer": prior.mean(1).tolist(),
        "pixel_mean_rank_by_layer": pixel.mean(1).tolist(),
        "pixel_top1_by_layer": (pixel == 0).double().mean(1).tolist(),
        "prior_top1_by_layer": (prior == 0).double().mean(1).tolist(),
    }
