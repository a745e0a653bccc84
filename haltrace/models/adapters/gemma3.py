"""Gemma 3 (image-text-to-text): SigLIP tower -> ``multi_modal_projector`` (norm, avg-pool, linear) -> Gemma 3.

Gemma 3 blocks apply ``post_attention_layernorm`` / ``post_feedforward_layernorm`` to the sublayer outputs
before adding them to the residual; ``attn_out``/``mlp_out`` are the raw ``self_attn``/``mlp`` outputs (before
those norms), so they are *not* the residual contributions. ``hidden_states[0]`` is already scaled by
``sqrt(d)`` (the scaled embedding module does it).

>>> from haltrace.models.adapters import adapter_for
>>> from haltrace.models.tiny import build_tiny
>>> adapter = adapter_for(build_tiny("gemma3")[0])
>>> adapter.family, adapter.nested_images, type(adapter.projector).__name__
('gemma3', True, 'Gemma3MultiModalProjector')
"""

from __future__ import annotations

from haltrace.models.adapters.base import register_adapter
from haltrace.models.adapters.llava import LlavaAdapter


@register_adapter("gemma3")
class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"
    nested_images = True  # Gemma3Processor wants one list of images per prompt
    tl_vision_hooks_match = False  # TransformerLens' vision_projector.hook_in is not the projector input here

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import gemma3_grid

        return gemma3_grid(self.config, n_image_tokens)
