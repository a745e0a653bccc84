"""Qwen2-VL and Qwen2.5-VL: ``model.visual`` (ViT + ``merger``) -> Qwen2 language model with M-RoPE.

The vision tower works on a flat sequence of patches for all images; ``vision_out`` is the merger input split
back per image ``[n_images, n_patches, d_vision]`` and ``projector_out`` the merger output
``[n_images, n_tokens, d]`` (n_tokens = n_patches / merge_size**2). Qwen2.5-VL reorders patches into attention
windows inside the tower; we undo that so rows follow the processor's patch order. When images differ in size
the per-image rows cannot be stacked and the tensors stay flat: ``[1, total, d]`` (a warning says so).

>>> adapter_for(qwen2_vl_hf_model).projector  # doctest: +SKIP
PatchMerger(...)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from haltrace.models.adapters.base import register_adapter
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

    def register_vision_hook(self, kind: str, sink: Callable[[torch.Tensor], None]) -> list[Any]:
        # hook the whole tower: it sees grid_thw (needed to split per image) and returns the merger output
        # already in processor order (Qwen2.5 reorders after the merger)
        if kind not in ("vision_out", "projector_out"):
            raise ValueError(f"unknown vision hook {kind!r}")
        visual = self.vision_tower
        state: dict[str, torch.Tensor] = {}
        merge_unit = visual.spatial_merge_size**2

        def pre(_module, args, kwargs):
            state["grid"] = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

        def post(_module, _args, _kwargs, out):
            grid = state["grid"]
            patches = [int(n) for n in grid.prod(-1)]
            if kind == "projector_out":
                sink(_split_per_image(out.pooler_output, [n // merge_unit for n in patches], kind))
                return
            hidden = out.last_hidden_state
            reverse = self._window_reverse(grid)
            if reverse is not None:
                hidden = hidden.reshape(-1, merge_unit, hidden.shape[-1])[reverse].reshape(hidden.shape)
            sink(_split_per_image(hidden, patches, kind))

        return [visual.register_forward_pre_hook(pre, with_kwargs=True),
                visual.register_forward_hook(post, with_kwargs=True)]

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import qwen_vl_grid

        return qwen_vl_grid(self.config, inputs, n_image_tokens, row)
