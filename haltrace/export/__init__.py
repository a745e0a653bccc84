"""Export steering vectors: haltrace's safetensors + JSON format (the source of truth) and llama.cpp GGUF
control vectors. The optional ``gguf`` package (``pip install 'haltrace[gguf]'``) is imported only for GGUF.

>>> import torch
>>> from haltrace.export import export, read_gguf
>>> from haltrace.steering.vector import SteeringVector
>>> _ = SteeringVector.from_mass_mean(torch.ones(4, 128), torch.zeros(4, 128), layers=[2],
...                                   hidden_size=128).save("vectors/entity")
>>> result = export("vectors/entity.safetensors", "entity.gguf", format="gguf")
>>> result.layers
{'resid_post.2': 'direction.2'}
>>> read_gguf("entity.gguf").directions[2].shape
torch.Size([128])

CLI: ``haltrace export VECTOR --format gguf|safetensors --out FILE [--model-hint TEXT] [--json]``.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (resolved on first access, so importing haltrace.export stays cheap)
_LAZY = {
    "export": "haltrace.export.formats",
    "export_haltrace": "haltrace.export.formats",
    "ExportResult": "haltrace.export.formats",
    "FORMATS": "haltrace.export.formats",
    "export_gguf": "haltrace.export.gguf",
    "read_gguf": "haltrace.export.gguf_read",
    "ControlVector": "haltrace.export.gguf_read",
    "gguf_layer_map": "haltrace.export.gguf",
    "ExportError": "haltrace.export.base",
    "vector_from_fitted": "haltrace.export.convert",
    "load_vector": "haltrace.export.convert",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haltrace.export' has no attribute {name!r}")
