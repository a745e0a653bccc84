"""Plotly figures for lens ranks, attention-to-image and prior-vs-pixel curves, written as self-contained HTML.

Every HTML file embeds plotly.js (``include_plotlyjs=True``, no CDN) so it opens offline, and is written to a
temporary file in the target folder, then moved into place with ``os.replace`` (never a half-written file).
Data go in as plain lists, so the numbers appear verbatim in the HTML (plotly encodes numpy arrays as base64).

>>> fig = rank_heatmap([[3, 0], [1, 2]], ["resid_post.0", "resid_post.1"], ["red", "blue"])
>>> path = write_html(fig, "lens.html")
>>> "plotly" in path.read_text()
True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _rows(values: Any) -> list:
    """A tensor / ndarray / nested sequence as nested Python lists of plain numbers."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        return values.tolist()
    return [_rows(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v for v in values]


def write_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a self-contained HTML file (plotly.js inlined) atomically; returns the path.

    >>> write_html(rank_heatmap([[0]], ["l0"], ["red"]), "out/fig.html")
    PosixPath('out/fig.html')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fig.write_html(handle, include_plotlyjs=True, full_html=True)
        os.chmod(tmp, 0o644)  # mkstemp files are private; a report should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def rank_heatmap(
    ranks: Any,
    layer_labels: Sequence[str],
    x_labels: Sequence[str],
    *,
    title: str = "Logit lens: rank of each target per layer (0 = top-1)",
    x_title: str = "target",
) -> go.Figure:
    """Heatmap of lens ranks ``[layers, X]`` (X = targets or positions). Colour is ``log10(1 + rank)`` so that
    ranks 0..10 stay visible next to ranks in the thousands; hover shows the rank itself.

    >>> from haltrace.trace.lens import logit_lens
    >>> res = logit_lens(model, model.prepare(["what color is the"]), ["red", "blue"], positions="last")
    >>> fig = rank_heatmap(res.target_ranks[:, 0, -1], res.layers, res.targets)
    >>> len(fig.data[0].z), len(fig.data[0].z[0])   # layers x targets
    (2, 2)
    """
    import math

    z = _rows(ranks)
    if len(z) != len(layer_labels) or any(len(r) != len(x_labels) for r in z):
        raise ValueError(f"ranks must be [{len(layer_labels)} layers, {len(x_labels)} columns]")
    colour = [[math.log10(1 + float(v)) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=colour, x=list(x_labels), y=list(layer_labels), customdata=z, text=z, texttemplate="%{text}",
        colorscale="Viridis", reversescale=True, colorbar={"title": "log10(1+rank)"},
        hovertemplate="layer %{y}<br>" + x_title + " %{x}<br>rank %{customdata}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="layer", yaxis={"autorange": "reversed"})
    return fig


def image_attention_heatmap(
    ratio: Any,
    layer_labels: Sequence[str] | None = None,
    *,
    title: str = "Attention to image tokens per layer and head",
) -> go.Figure:
    """Heatmap of the attention-to-image ratio ``[layers, heads]`` (values in 0..1).

    >>> from haltrace.trace.attention import attention_to_image
    >>> air = attention_to_image(model, inputs)
    >>> fig = image_attention_heatmap(air.ratio[0, 0])   # row 0, last token: [layers, heads]
    >>> len(fig.data[0].z), len(fig.data[0].z[0])
    (2, 4)
    """
    z = _rows(ratio)
    layers = list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(len(z))]
    heads = [f"head {h}" for h in range(len(z[0]) if z else 0)]
    fig = go.Figure(go.Heatmap(
        z=z, x=heads, y=layers, zmin=0, zmax=1, colorscale="Magma", colorbar={"title": "mass on image"},
        hovertemplate="%{y}, %{x}<br>attention to image %{z:.4f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", yaxis={"autorange": "reversed"})
    return fig


def prior_pixel_figure(
    prior_leads: Sequence[float],
    prior_mean_rank: Sequence[float],
    pixel_mean_rank: Sequence[float],
    layer_labels: Sequence[str] | None = None,
    *,
    n: int | None = None,
    title: str = "Prior vs pixel colour across layers (logit lens)",
) -> go.Figure:
    """Per layer: fraction of items where the prior colour outranks the pixel colour (left axis), and the
    mean lens rank of each colour (right axis, log scale, lower = more likely).

    >>> stats = {"prior_leads_by_layer": [0.9, 0.2], "prior_mean_rank_by_layer": [1.0, 40.0],
    ...          "pixel_mean_rank_by_layer": [30.0, 0.5]}
    >>> fig = prior_pixel_figure(stats["prior_leads_by_layer"], stats["prior_mean_rank_by_layer"],
    ...                          stats["pixel_mean_rank_by_layer"])
    >>> len(fig.data)   # the prior-leads bars and the two mean-rank lines
    3
    """
    leads, prior, pixel = _rows(prior_leads), _rows(prior_mean_rank), _rows(pixel_mean_rank)
    if not len(leads) == len(prior) == len(pixel):
        raise ValueError("prior_leads, prior_mean_rank and pixel_mean_rank need one value per layer")
    x = list(layer_labels) if layer_labels is not None else [f"resid_post.{i}" for i in range(len(leads))]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=leads, name="prior outranks pixel (fraction)", mode="lines+markers",
                             line={"width": 3}), secondary_y=False)
    # plotted as 1 + rank so a log axis can show rank 0 (top-1); hover shows the rank itself
    for values, name, dash in ((prior, "mean rank of prior colour", "dot"), (pixel, "mean rank of pixel colour",
                                                                             "dash")):
        fig.add_trace(go.Scatter(x=x, y=[1 + float(v) for v in values], customdata=values, name=name,
                                 mode="lines+markers", line={"dash": dash},
                                 hovertemplate="%{customdata:.2f}"), secondary_y=True)
    fig.update_yaxes(title_text="fraction of items", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="1 + mean rank (1 = top-1)", type="log", secondary_y=True)
    subtitle = f" (n = {n})" if n is not None else ""
    fig.update_layout(title=title + subtitle, xaxis_title="layer", hovermode="x unified")
    return fig
