"""Text-only Llama-layout families: Llama, Mistral, Qwen2 (and Gemma 3's text model, same layout).

>>> from haltrace.models.adapters import adapter_for
>>> from haltrace.models.tiny import build_tiny
>>> adapter_for(build_tiny("mistral")[0]).family
'llama'
"""

from __future__ import annotations

from haltrace.models.adapters.base import DecoderAdapter, register_adapter


@register_adapter("llama", "mistral", "qwen2", "gemma3_text")
class LlamaAdapter(DecoderAdapter):
    """``model.layers[i].self_attn.o_proj`` / ``.mlp``, final ``model.norm``, ``lm_head``."""

    family = "llama"
