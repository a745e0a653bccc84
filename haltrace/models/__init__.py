"""Load and wrap Hugging Face LLMs/VLMs: :func:`load`, :class:`Model`, per-family adapters, tiny test models.

>>> import haltrace
>>> model = haltrace.load("shapes-llava")  # doctest: +SKIP
"""

from haltrace.models.adapters import Adapter, adapter_for, register_adapter, supported_model_types
from haltrace.models.base import Model
from haltrace.models.loading import load

__all__ = ["Adapter", "Model", "adapter_for", "load", "register_adapter", "supported_model_types"]
