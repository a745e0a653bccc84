"""Shared fixtures: tiny random-weight models of every family (built once per session, offline)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., object]:
    """``tiny_model(family, attn_implementation="eager")`` -> cached ``haltrace.models.Model``."""
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny

    cache: dict[tuple[str, str], Model] = {}

    def get(family: str, attn_implementation: str = "eager") -> Model:
        key = (family, attn_implementation)
        if key not in cache:
            hf_model, proc = build_tiny(family, attn_implementation=attn_implementation)
            cache[key] = Model.from_hf(hf_model, proc, name=f"tiny-{family}")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_inputs(tiny_model) -> Callable[..., object]:
    """``tiny_inputs(family, images=True)`` -> 2-row left-padded inputs for the tiny model (on its device)."""
    from haltrace.models.tiny import build_tiny_inputs

    def get(family: str, images: bool = True, n: int = 2):
        model = tiny_model(family)
        return model.to_device(build_tiny_inputs(family, model.processor or model.tokenizer, n=n, images=images))

    return get


@pytest.fixture(scope="session")
def tiny_llava(tiny_model):
    return tiny_model("llava")


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model):
    return tiny_model("gpt2")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread mostly adds
    contention (a forward measured 15x slower with two threads under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def random_organism():
    """``(model, world)``: a random-weight ShapesWorld organism (real architecture and tokenizer, untrained), for
    method plumbing that needs the organism's vocabulary but no trained phenomena."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from haltrace.models import Model
    from haltrace.organism.processing import build_processor
    from haltrace.organism.train import PRESETS, build_model_config
    from haltrace.organism.world import ShapesWorld

    world = ShapesWorld()
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(build_model_config(world, PRESETS["tiny"]))
    return Model.from_hf(hf, build_processor(world), name="random-organism"), world


@pytest.fixture(scope="session")
def organism_folder(tmp_path_factory) -> str:
    """An organism folder for CLI tests: $HALTRACE_TEST_ORGANISM, else the shipped one, else a 30-step tiny one
    (~30 s CPU; plumbing only, no phenomena)."""
    given = os.environ.get("HALTRACE_TEST_ORGANISM")
    if given and (Path(given) / "world.json").exists():
        return given
    shipped = Path(__file__).resolve().parents[1] / "artifacts" / "organisms" / "shapes-llava"
    if (shipped / "config.json").exists():
        return str(shipped)
    from haltrace.organism.train import train_organism

    out = tmp_path_factory.mktemp("organism") / "tiny"
    train_organism(out, preset="tiny", steps=30, progress=False)
    return str(out)
