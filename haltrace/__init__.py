"""haltrace: find where and why LLMs and VLMs hallucinate, and steer them at inference time.

Quick start::

    import haltrace
    model = haltrace.load("shapes-llava")          # the shipped model organism
    acts = model.capture(model.prepare(["<image> caption :"], images=[img]), hooks=["resid_post.2"])

Heavy submodules are imported lazily, so ``import haltrace`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from haltrace._version import __version__

# public name -> module that defines it (resolved on first access); a name whose module is haltrace.<name>
# itself (conventions, explain) is that module
_LAZY = {
    "load": "haltrace.models",
    "Model": "haltrace.models",
    "harvest": "haltrace.trace.harvest",
    "ActivationStore": "haltrace.trace.store",
    "conventions": "haltrace.conventions",
    "explain": "haltrace.explain",
    "steer": "haltrace.steering.engine",
    "Add": "haltrace.steering.engine",
    "Project": "haltrace.steering.engine",
    "SteeringVector": "haltrace.steering.vector",
    "get_method": "haltrace.steering.registry",
    "list_methods": "haltrace.steering.registry",
    "save_fitted": "haltrace.steering.results",
    "load_fitted": "haltrace.steering.results",
    "logit_lens": "haltrace.trace.lens",
    "attention_to_image": "haltrace.trace.attention",
    "evaluate": "haltrace.evals.suite",
    "load_items": "haltrace.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'haltrace' has no attribute {name!r}")
