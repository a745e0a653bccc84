"""Qwen2-VL and Qwen2.5-VL: ``model.visual`` (ViT + ``merger``) -> Qwen2 language model with M-RoPE.

The vision tower works on a flat sequence of patches for all images; ``vision_out`` is the merger input split
back per image ``[n_images, n_patches, d_vision]`` and ``projector_out`` the merger output
``[n_images, n_tokens, d]`` (n_tokens = n_patches / merge_size**2). Qwen2.5-VL reorders patches into attention
windows inside the tower; we undo that so rows follow the processor's patch order. When images differ in size
the per-image rows cannot be stacked and the tensors stay flat: ``[1, total, d]`` (a warning says so).

>>> from haltrace.models.adapters import adapter_for
>>> from haltrace.models.tiny import build_tiny
>>> adapter = adapter_for(build_tiny("qwen2_vl")[0])
>>> type(adapter.projector).__name__, adapter.position_scheme, adapter.site("projector_out").module is adapter.vision_tower
('PatchMerger', 'mrope', True)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from haltrace.conventions import HookPoint
from haltrace.models.adapters.base import Site, register_adapter
from haltrace.models.adapters.llava import LlavaAdapter


def _split_per_image(flat: torch.Tensor, sizes: list[int], kind: str) -> torch.Tensor:
    if len(set(sizes)) == 1:
        return flat.reshape(len(sizes), sizes[0], flat.shape[-1])
    warnings.warn(f"{kind}: images have different token counts {sizes}; returning them flat as [1, total, d]",
                  stacklevel=3)
    return flat.unsqueeze(0)


@register_adapter("qwen2_vl", "qwen2_5_vl")
class Qwen2VLAdapter(LlavaAdapter):
    family = "qwen2_vl"
    image_placeholder_wrap = ("<|vision_start|>", "<|vision_end|>")
    position_scheme = "mrope"  # 3-D positions the model derives from the image grid
    tl_vision_hooks_match = False  # the vision hooks read the whole tower (see vision_site)

    @property
    def vision_tower(self) -> nn.Module | None:  # type: ignore[override]
        return self._inner.visual

    @property
    def projector(self) -> nn.Module | None:  # type: ignore[override]
        return self._inner.visual.merger

    def _window_reverse(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL only: index that puts merge units back in processor order (argsort of window_index)."""
        visual = self.vision_tower
        if not hasattr(visual, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        patch = getattr(visual, "patch_size", None) or visual.config.patch_size
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=patch)
        return torch.argsort(window_index)

    def vision_site(self, point: HookPoint) -> Site:  # type: ignore[override]
        # hook the whole tower: its call carries grid_thw (needed to split per image) and it returns the merger
        # output already in processor order (Qwen2.5 reorders after the merger)
        kind = point.kind
        if kind not in ("vision_out", "projector_out"):
            raise ValueError(f"unknown vision hook {kind!r}")
        visual = self.vision_tower
        merge_unit = visual.spatial_merge_size**2

        def read(args: tuple, kwargs: dict, out: Any) -> torch.Tensor:
            grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            patches = [int(n) for n in grid.prod(-1)]
            if kind == "projector_out":
                return _split_per_image(out.pooler_output, [n // merge_unit for n in patches], kind)
            hidden = out.last_hidden_state
            reverse = self._window_reverse(grid)
            if reverse is not None:
                hidden = hidden.reshape(-1, merge_unit, hidden.shape[-1])[reverse].reshape(hidden.shape)
            return _split_per_image(hidden, patches, kind)

        return Site(point, visual, "post", per_image=True, reader=read)

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import qwen_vl_grid

        return qwen_vl_grid(self.config, inputs, n_image_tokens, row)
