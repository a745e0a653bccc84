"""Gemma 3 (image-text-to-text): SigLIP tower -> ``multi_modal_projector`` (norm, avg-pool, linear) -> Gemma 3.

Gemma 3 blocks apply ``post_attention_layernorm`` / ``post_feedforward_layernorm`` to the sublayer outputs
before adding them to the residual; ``attn_out``/``mlp_out`` are the raw ``self_attn``/``mlp`` outputs (before
those norms), so they are *not* the residual contributions. ``hidden_states[0]`` is already scaled by
``sqrt(d)`` (the scaled embedding module does it).

>>> adapter_for(gemma3_hf_model).image_token_id  # doctest: +SKIP
"""

from __future__ import annotations

from haltrace.models.adapters.base import register_adapter
from haltrace.models.adapters.llava import LlavaAdapter


@register_adapter("gemma3")
class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"

    def patch_grid(self, inputs, n_image_tokens, row=0, image_size=None, processor=None):  # type: ignore[override]
        from haltrace.models.grids import gemma3_grid

        return gemma3_grid(self.config, n_image_tokens)
