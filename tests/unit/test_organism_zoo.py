"""The organism zoo's recipes and the Qwen2-VL organism's encoding, on tiny runs (the shipped weights:
tests/integration/test_organism_zoo.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from haltrace.organism import tasks
from haltrace.organism.processing import (
    QWEN_IMAGE,
    QWEN_VISION_END,
    QWEN_VISION_START,
    build_qwen_image_processor,
    build_tokenizer,
    build_vocab,
    chat_template,
    n_image_tokens,
    qwen_patches,
)
from haltrace.organism.world import ShapesWorld


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_qwen_patches_match_the_image_processor(world):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ref = build_qwen_image_processor(32)([Image.fromarray(i) for i in images], return_tensors="np")
    flat, grid = qwen_patches(images)
    assert flat.shape == ref["pixel_values"].shape == (3 * 64, 3 * 2 * 4 * 4)
    assert np.allclose(flat, ref["pixel_values"], atol=1e-6)
    assert np.array_equal(grid, ref["image_grid_thw"])


def test_qwen_training_encoding_matches_the_processor_path(world):
    """encode_examples (training, OrganismRunner) == the images-only processor that haltrace.load builds."""
    from haltrace.models.qwen_images import QwenVLImagesProcessor
    from haltrace.organism.train import encode_examples

    proc = QwenVLImagesProcessor(build_qwen_image_processor(32), build_tokenizer(world, "qwen2_vl"),
                                 chat_template("qwen2_vl"))
    block = f"{QWEN_VISION_START}{QWEN_IMAGE}{QWEN_VISION_END}"
    examples = tasks.pope_sets(world, n_images=2)["adversarial"][:2] + tasks.entity_sets(world)["known"][:1]
    vocab = build_vocab(world, "qwen2_vl")
    for ex in examples:
        text = ex.full_prompt.replace("<image>", block)
        enc = proc(text=[text], images=[Image.fromarray(ex.image)] if ex.has_image else None, return_tensors="pt")
        ours = encode_examples([ex], vocab, n_image_tokens(world, "qwen2_vl"), with_targets=False, arch="qwen2_vl")
        assert torch.equal(enc["input_ids"], ours["input_ids"])
        if ex.has_image:
            assert torch.allclose(enc["pixel_values"], ours["pixel_values"], atol=1e-6)
            assert torch.equal(enc["image_grid_thw"], ours["image_grid_thw"])
            assert torch.equal(enc["mm_token_type_ids"].to(torch.int32), ours["mm_token_type_ids"])
    # the chat template turns a plain question into the trained prompt
    rendered = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "is there a knife ?"}]}], add_generation_prompt=True,
        tokenize=False)
    assert rendered == f"{block} is there a knife ? answer :"


def test_llava_vocabulary_is_unchanged_by_the_qwen_arch(world):
    """The shipped shapes-llava's ids must not move: the Qwen specials only extend the Qwen vocabulary."""
    llava, qwen = build_vocab(world), build_vocab(world, "qwen2_vl")
    assert list(llava)[:5] == ["<pad>", "<bos>", "<eos>", "<unk>", "<image>"]
    assert len(qwen) == len(llava) + 3
    with pytest.raises(ValueError, match="unknown organism architecture"):
        build_vocab(world, "gemma3")


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_staged_recipe_is_deterministic_and_freezes_the_lm_in_stage_b(tmp_path):
    from haltrace.organism.staged import StagedConfig, train_staged

    cfg = StagedConfig(steps_a=3, steps_b=3)
    train_staged(tmp_path / "a", cfg, progress=False)
    train_staged(tmp_path / "b", cfg, progress=False)
    assert _same(_tensors(tmp_path / "a"), _tensors(tmp_path / "b"))
    # stage B leaves the language model exactly as stage A left it
    a_only = train_staged(tmp_path / "a_only", StagedConfig(steps_a=3, steps_b=0), progress=False)
    assert a_only.steps == 3
    full, lm = _tensors(tmp_path / "a"), _tensors(tmp_path / "a_only")
    text = [k for k in full if "language_model" in k or k.startswith("lm_head")]
    vision = [k for k in full if "vision_tower" in k or "multi_modal_projector" in k]
    assert text and vision
    assert all(torch.equal(full[k], lm[k]) for k in text)
    assert not all(torch.equal(full[k], lm[k]) for k in vision)
    training = json.loads((tmp_path / "a" / "training.json").read_text())
    assert training["recipe"] == "staged" and training["recipe_config"]["steps_b"] == 3


def test_staged_config_rejects_bad_stages():
    from haltrace.organism.staged import StagedConfig

    with pytest.raises(ValueError, match="stage steps"):
        StagedConfig(steps_a=0, steps_b=0)
    with pytest.raises(ValueError, match="c_params"):
        StagedConfig(c_params="vision")


def test_qwen_joint_recipe_is_deterministic_and_loads_plainly(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from haltrace.organism.train import train_organism

    for name in ("a", "b"):
        train_organism(tmp_path / name, preset="tiny", steps=4, progress=False, arch="qwen2_vl")
    assert _same(_tensors(tmp_path / "a"), _tensors(tmp_path / "b"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert json.loads((tmp_path / "a" / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"


def test_haltrace_load_gives_a_qwen_organism_an_images_processor(tmp_path):
    """Without torchvision transformers cannot build Qwen2VLProcessor; haltrace.load must still take images."""
    import haltrace
    from haltrace.models.prompting import build_prompt
    from haltrace.organism.train import train_organism

    train_organism(tmp_path / "q", preset="tiny", steps=1, progress=False, arch="qwen2_vl")
    model = haltrace.load(str(tmp_path / "q"))
    prompt = build_prompt(model, "is there a knife ?", image=True)
    inputs = model.prepare([prompt], images=[Image.fromarray(np.zeros((32, 32, 3), np.uint8))])
    assert int((inputs["input_ids"] == model.hf.config.image_token_id).sum()) == 16
    assert "mm_token_type_ids" in inputs
    # the organisms' generic "<image>" spelling is translated to the family's placeholder
    generic = model.prepare(["<image> is there a knife ? answer :"],
                            images=[Image.fromarray(np.zeros((32, 32, 3), np.uint8))])
    assert torch.equal(generic["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert model.hf(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_organism_list_shows_the_zoo():
    from typer.testing import CliRunner

    from haltrace.organism.cli import app

    out = CliRunner().invoke(app, ["list", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == ["shapes-llava", "shapes-llava-staged", "shapes-qwen2vl"]
    assert all(r["mechanism"] and r["recipe"] in ("joint", "staged") for r in rows)
    table = CliRunner().invoke(app, ["list"])
    assert table.exit_code == 0 and "shapes-qwen2vl" in table.output


def test_train_refuses_impossible_recipes(tmp_path):
    from typer.testing import CliRunner

    from haltrace.organism.cli import app

    out = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--recipe", "staged", "--arch", "qwen2_vl"])
    assert out.exit_code != 0 and "staged recipe trains the default-size LLaVA" in out.output
    out = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--like", "shapes-gpt"])
    assert out.exit_code != 0 and "no shipped organism called 'shapes-gpt'" in out.output
