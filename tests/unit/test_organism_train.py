"""Training smoke test: loss falls, same seed -> identical weights, the folder loads with plain transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from haltrace.organism.train import train_organism

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("org") / "tiny"
    result = train_organism(out, preset="tiny", seed=0, steps=STEPS, progress=False)
    return out, result


def test_loss_falls(trained):
    _, result = trained
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_same_seed_same_weights(trained, tmp_path):
    out, _ = trained
    again = tmp_path / "again"
    train_organism(again, preset="tiny", seed=0, steps=STEPS, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_different_weights(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    train_organism(other, preset="tiny", seed=1, steps=3, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(other / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_loads_offline_with_plain_transformers(trained, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = trained
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert json.loads((out / "world.json").read_text())["p_pair"] > 0
    enc = processor(text=["is there a knife ? answer :"], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape[-1] == len(processor.tokenizer)


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'.*default.*tiny"):
        train_organism(tmp_path / "x", preset="huge")


def test_no_half_written_folder_on_failure(tmp_path, monkeypatch):
    from haltrace.organism import train as train_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_mod, "save_processor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        train_organism(tmp_path / "broken", preset="tiny", steps=1, progress=False)
    assert not (tmp_path / "broken").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".broken")]
