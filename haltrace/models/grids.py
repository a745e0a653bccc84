"""Where each image token of a VLM prompt sits on the image: the family's patch grid (for maps over the image).

Every VLM adapter has ``patch_grid(inputs, n_image_tokens, row=0, image_size=None)`` returning a
:class:`PatchGrid`: one or more *views* (a rows x cols matrix of image-token ordinals, i.e. indices into the
prompt's image tokens in order of appearance, ``-1`` for a cell no token covers) and the box of the original
image each view covers. The layouts:

* LLaVA-1.5: one square grid ``(image_size / patch)^2``, row-major, over the processor's centre crop;
* LLaVA-NeXT: the base view (square grid over the whole image), then the high-resolution tiles, stitched,
  unpadded to the image's aspect ratio, with one ``image_newline`` token ending every row (those are not cells);
* Qwen2-VL / Qwen2.5-VL: the merged grid ``(h / merge) x (w / merge)`` from ``image_grid_thw``, row-major;
* Gemma 3: the pooled square grid ``sqrt(mm_tokens_per_image)`` over the whole (resized) image.

A layout that does not match the prompt's image-token count returns a grid with no views and a ``note`` saying
why, so a page can say so instead of drawing a wrong map.

>>> g = square_grid(16)
>>> g.shape, g.views[0].cells[1]
((4, 4), [4, 5, 6, 7])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GridView:
    """``cells[r][c]``: the image-token ordinal at row ``r``, column ``c`` (``-1``: none); ``box``: the part of
    the original image the view covers, as fractions ``(x0, y0, x1, y1)``."""

    name: str
    cells: list[list[int]]
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    @property
    def rows(self) -> int:
        return len(self.cells)

    @property
    def cols(self) -> int:
        return len(self.cells[0]) if self.cells else 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "cols": self.cols, "cells": self.cells, "box": list(self.box)}


@dataclass
class PatchGrid:
    """The views of one image's tokens; no views means no spatial map can be drawn (``note`` says why)."""

    family: str
    n_image_tokens: int
    views: list[GridView] = field(default_factory=list)
    note: str = ""

    @property
    def spatial(self) -> bool:
        return bool(self.views)

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the first view (the one a page shows by default)."""
        return (self.views[0].rows, self.views[0].cols) if self.views else None

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "n_image_tokens": self.n_image_tokens, "spatial": self.spatial,
                "views": [v.as_dict() for v in self.views], "note": self.note}


def no_grid(family: str, n: int, note: str) -> PatchGrid:
    return PatchGrid(family, n, [], note)


def _block(start: int, rows: int, cols: int, stride: int | None = None) -> list[list[int]]:
    stride = cols if stride is None else stride
    return [[start + r * stride + c for c in range(cols)] for r in range(rows)]


def square_grid(n: int, family: str = "llava", name: str = "image",
                box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> PatchGrid:
    """A row-major ``sqrt(n) x sqrt(n)`` grid (no views when ``n`` is not a square)."""
    side = math.isqrt(n)
    if side * side != n or n == 0:
        return no_grid(family, n, f"{n} image tokens do not form a square grid")
    return PatchGrid(family, n, [GridView(name, _block(0, side, side), box)],
                     f"{side}x{side} patch grid, row-major")


def centre_crop_box(image_processor: Any, image_size: tuple[int, int] | None) -> tuple[float, float, float, float]:
    """The part of a ``(width, height)`` image a CLIP-style processor keeps: resize the short side, centre crop."""
    full = (0.0, 0.0, 1.0, 1.0)
    if image_size is None or image_processor is None or not getattr(image_processor, "do_center_crop", False):
        return full
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    short = size.get("shortest_edge") if isinstance(size, Mapping) else None
    if not short or not isinstance(crop, Mapping) or "height" not in crop:
        return full
    w, h = image_size
    scale = short / min(w, h)
    rw, rh = w * scale, h * scale
    cw, ch = min(crop["width"], rw), min(crop["height"], rh)
    x0, y0 = (rw - cw) / 2 / rw, (rh - ch) / 2 / rh
    return (x0, y0, 1 - x0, 1 - y0)


def llava_grid(model_config: Any, processor: Any, n: int, image_size: tuple[int, int] | None) -> PatchGrid:
    box = centre_crop_box(getattr(processor, "image_processor", None), image_size)
    grid = square_grid(n, "llava", box=box)
    vc = getattr(model_config, "vision_config", None)
    if grid.spatial and vc is not None:
        expected = (vc.image_size // vc.patch_size) ** 2
        if expected != n:
            return no_grid("llava", n, f"{n} image tokens, but the vision tower makes {expected} patches")
    return grid


def llava_next_grid(model_config: Any, inputs: Mapping[str, Any], n: int, row: int = 0) -> PatchGrid:
    """Base view + stitched, unpadded tiles (see :meth:`LlavaNextModel.pack_image_features`)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    sizes = inputs.get("image_sizes")
    vc = model_config.vision_config
    if sizes is None:
        return no_grid("llava_next", n, "no image_sizes in the inputs: cannot place LLaVA-NeXT tiles")
    side = vc.image_size // vc.patch_size
    size = sizes[row]
    nph, npw = get_anyres_image_grid_shape(size.tolist() if hasattr(size, "tolist") else size,
                                           model_config.image_grid_pinpoints, vc.image_size)
    index = torch.arange(nph * npw * side * side).view(nph, npw, side, side, 1)
    index = index.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [1, nph*side, npw*side]
    index = unpad_image(index, size)
    rows, cols = int(index.shape[1]), int(index.shape[2])
    base = side * side
    newline = 1  # LLaVA-NeXT ends every stitched row with its learned image_newline token
    expected = base + rows * (cols + newline)
    if expected != n:
        return no_grid("llava_next", n, f"{n} image tokens, but base {side}x{side} + tiles {rows}x({cols}+1) make "
                                        f"{expected}")
    views = [GridView("base view", _block(0, side, side)),
             GridView(f"high-res tiles ({nph}x{npw})", _block(base, rows, cols, stride=cols + newline))]
    return PatchGrid("llava_next", n, views,
                     f"base {side}x{side} grid over the whole image + {nph}x{npw} tiles stitched to {rows}x{cols} "
                     "(unpadded; each row ends with an image_newline token, not drawn)")


def qwen_vl_grid(model_config: Any, inputs: Mapping[str, Any], n: int, row: int = 0) -> PatchGrid:
    grid_thw = inputs.get("image_grid_thw")
    if grid_thw is None:
        return no_grid("qwen2_vl", n, "no image_grid_thw in the inputs")
    merge = int(getattr(model_config.vision_config, "spatial_merge_size", 2))
    t, h, w = (int(v) for v in grid_thw[row])
    rows, cols = h // merge, w // merge
    if t * rows * cols != n:
        return no_grid("qwen2_vl", n, f"{n} image tokens, but image_grid_thw {t}x{h}x{w} / merge {merge} gives "
                                      f"{t * rows * cols}")
    views = [GridView("image" if t == 1 else f"frame {k}", _block(k * rows * cols, rows, cols)) for k in range(t)]
    return PatchGrid("qwen2_vl", n, views, f"merged {rows}x{cols} grid ({h}x{w} patches, merge {merge}), row-major")


def gemma3_grid(model_config: Any, n: int) -> PatchGrid:
    per_image = int(getattr(model_config, "mm_tokens_per_image", n))
    if per_image != n:
        return no_grid("gemma3", n, f"{n} image tokens, but mm_tokens_per_image is {per_image} (pan-and-scan "
                                    "crops are not placed)")
    grid = square_grid(n, "gemma3")
    grid.note = f"{grid.shape[0]}x{grid.shape[1]} pooled tokens over the whole (resized) image" if grid.spatial \
        else grid.note
    return grid
