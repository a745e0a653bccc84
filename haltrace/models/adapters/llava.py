"""LLaVA (1.5): CLIP vision tower -> ``multi_modal_projector`` (MLP) -> Llama-style language model.

``vision_out`` is the projector input ``[n_images, n_patches, d_vision]`` (the selected vision layer, CLS
already dropped by the "default" strategy); ``projector_out`` is ``[n_images, n_patches, d]``.

>>> from haltrace.models.adapters import adapter_for
>>> from haltrace.models.tiny import build_tiny
>>> adapter = adapter_for(build_tiny("llava")[0])
>>> type(adapter.projector).__name__, adapter.site("vision_out").module is adapter.projector
('LlavaMultiModalProjector', True)
"""

from __future__ import annotations

from torch import nn

from haltrace.models.adapters.base import DecoderAdapter, register_adapter


@register_adapter("llava")
class LlavaAdapter(DecoderAdapter):
    family = "llava"
    tl_vision_hooks_match = True

    @property
    def _inner(self) -> nn.Module:
        # transformers 5: <X>ForConditionalGeneration.model is <X>Model holding the three parts
        return getattr(self.hf, "model", self.hf)

    @property
    def vision_tower(self) -> nn.Module | None:  # type: ignore[override]
        return self._inner.vision_tower

    @property
    def projector(self) -> nn.Module | None:  # type: ignore[override]
        return self._inner.multi_modal_projector

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import llava_grid

        return llava_grid(self.config, processor, n_image_tokens, image_size)
