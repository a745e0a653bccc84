"""Per-family adapters. Importing this package registers every built-in adapter.

>>> from haltrace.models.adapters import adapter_for, supported_model_types
>>> "llava" in supported_model_types()
True
"""

from haltrace.models.adapters import gemma3, gpt2, llama, llava, llava_next, qwen2_vl  # noqa: F401  (register)
from haltrace.models.adapters.base import (
    ADAPTERS,
    Adapter,
    DecoderAdapter,
    adapter_for,
    first_tensor,
    register_adapter,
    supported_model_types,
)

__all__ = ["ADAPTERS", "Adapter", "DecoderAdapter", "adapter_for", "first_tensor", "register_adapter",
           "supported_model_types"]
