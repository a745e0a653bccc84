"""Doctests of the ``haltrace`` package: ``pytest`` collects every module's docstring examples (``--doctest-modules``
and ``testpaths`` in pyproject.toml; ``make test`` runs them with the tests).

Examples run offline, each in its own empty temporary folder, with these names ready (tiny random-weight models
from :mod:`haltrace.models.tiny`, built once per session and only when a doctest runs):

- ``model``: a tiny LLaVA :class:`~haltrace.models.Model` (2 blocks, d=32, 4 heads, eager attention)
- ``inputs``: two left-padded prompts for it, one image each; ``img``: a 28x28 RGB image
- ``gpt2_model``: a tiny text-only GPT-2 :class:`~haltrace.models.Model`

An example that needs a trained organism, a big checkpoint or the network keeps ``# doctest: +SKIP``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # doctests never download

#: modules whose examples run an optional package (an extra of ``pip install haltrace``): not collected when the
#: package is missing, so ``pytest --doctest-modules haltrace`` passes on a core install
_NEEDS_OPTIONAL: dict[str, str] = {
    "haltrace/trace/backends/__init__.py": "nnsight",  # capture_with(..., backend="nnsight")
    "haltrace/trace/backends/nnsight_backend.py": "nnsight",
    "haltrace/trace/backends/tl_backend.py": "transformer_lens",
    "haltrace/export/__init__.py": "gguf",
    "haltrace/export/formats.py": "gguf",
    "haltrace/export/gguf.py": "gguf",
    "haltrace/export/gguf_read.py": "gguf",
    "haltrace/probes/sae.py": "sae_lens",
}
collect_ignore = [path for path, package in _NEEDS_OPTIONAL.items() if importlib.util.find_spec(package) is None]

_TINY: dict[str, Any] = {}


def _tiny_namespace() -> dict[str, Any]:
    if not _TINY:
        import torch

        from haltrace.models import Model
        from haltrace.models.tiny import build_tiny, build_tiny_inputs, tiny_image

        torch.manual_seed(0)
        hf, processor = build_tiny("llava")
        model = Model.from_hf(hf, processor, name="tiny-llava")
        gpt2, tok = build_tiny("gpt2")
        _TINY.update(model=model, inputs=model.to_device(build_tiny_inputs("llava", processor)), img=tiny_image(),
                     gpt2_model=Model.from_hf(gpt2, tok, name="tiny-gpt2"))
    return _TINY


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest):
    """For doctest items only: the tiny objects above, an empty temporary working folder, one torch thread."""
    from _pytest.doctest import DoctestItem

    if not isinstance(request.node, DoctestItem):
        yield
        return
    import torch

    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(_tiny_namespace())
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
