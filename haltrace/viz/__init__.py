"""Figures: logit-lens rank heatmaps, attention-to-image heatmaps, prior-vs-pixel curves (self-contained HTML).

>>> from haltrace.viz import rank_heatmap, write_html
>>> write_html(rank_heatmap([[0, 4]], ["resid_post.0"], ["red", "blue"]), "lens.html")
PosixPath('lens.html')
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> defining module, imported on first access (plotly is slow to import)
_LAZY = {
    "write_html": "haltrace.viz.figures",
    "rank_heatmap": "haltrace.viz.figures",
    "image_attention_heatmap": "haltrace.viz.figures",
    "prior_pixel_figure": "haltrace.viz.figures",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haltrace.viz' has no attribute {name!r}")
