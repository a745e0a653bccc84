"""LLaVA-NeXT (1.6): like LLaVA, but each image is split into crops (AnyRes) before the vision tower.

``vision_out``/``projector_out`` therefore have one row per *crop* (base view first), not per image:
``[n_crops_total, n_patches, d]``. The unpadding and ``image_newline`` tokens are added after the projector.

>>> from haltrace.models.adapters import adapter_for
>>> from haltrace.models.tiny import build_tiny
>>> adapter_for(build_tiny("llava_next")[0]).family
'llava_next'
"""

from __future__ import annotations

from haltrace.models.adapters.base import register_adapter
from haltrace.models.adapters.llava import LlavaAdapter


@register_adapter("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import llava_next_grid

        return llava_next_grid(self.config, inputs, n_image_tokens, row)
