"""Model wrapper, adapters, loading and the tiny test models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from haltrace.models.tiny import IMAGE_PROMPTS, TINY_FAMILIES, tiny_image

FAMILIES = list(TINY_FAMILIES)
VLMS = [f for f in FAMILIES if f in IMAGE_PROMPTS]
EXPECTED_FAMILY = {"qwen2_5_vl": "qwen2_vl", "mistral": "llama", "qwen2": "llama"}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_facts(family, tiny_model):
    model = tiny_model(family)
    adapter = model.adapter
    assert adapter.family == EXPECTED_FAMILY.get(family, family)
    assert model.n_layers == adapter.n_layers == len(adapter.layers) == 2
    assert model.hidden_size == 32 and model.n_heads == 4 and model.head_dim == 8
    assert adapter.n_kv_heads in (2, 4)
    assert model.is_vlm == (family in VLMS)
    assert (adapter.vision_tower is not None) == (adapter.projector is not None) == model.is_vlm
    assert (adapter.image_token_id is not None) == model.is_vlm
    assert adapter.unembed.weight.shape[0] == model.hf.config.get_text_config().vocab_size
    for i in range(model.n_layers):
        assert isinstance(adapter.attention(i), nn.Module)
        assert isinstance(adapter.o_proj(i), nn.Module) and isinstance(adapter.mlp(i), nn.Module)
    assert isinstance(adapter.embed, nn.Embedding) and isinstance(adapter.final_norm, nn.Module)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    hooks = model.valid_hooks()
    assert "resid_post.1" in hooks and "attn_pattern.0" in hooks and "resid_post.2" not in hooks
    assert ("projector_out" in hooks) == model.is_vlm


@pytest.mark.parametrize("family", VLMS)
def test_prepare_with_images_and_image_token_mask(family, tiny_model):
    model = tiny_model(family)
    prompts = [IMAGE_PROMPTS[family], "a red " + IMAGE_PROMPTS[family]]
    inputs = model.prepare(prompts, images=[tiny_image(0), tiny_image(1)])
    mask = model.image_token_mask(inputs["input_ids"])
    assert mask.dtype == torch.bool and mask.shape == inputs["input_ids"].shape
    cap = model.capture(inputs, ["projector_out"])
    per_image = {"llava": 4, "qwen2_vl": 4, "qwen2_5_vl": 4, "gemma3": 4}.get(family)
    if per_image is not None:  # tiny configs: 2x2 patches after CLS drop / merging / pooling
        assert cap["projector_out"].shape[:2] == (2, per_image)
        assert mask.sum(1).tolist() == [per_image, per_image]
    else:  # llava-next: base view + crops, unpadded, plus newline tokens; just one block per row
        assert (mask.sum(1) > 0).all() and mask.sum(1)[0] == mask.sum(1)[1]
    # left padding: the shorter prompt starts with pad
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    assert inputs["pixel_values"].dtype == model.dtype


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prepare_text_left_pads(family, tiny_model):
    model = tiny_model(family)
    inputs = model.prepare(["what color is the circle", "hello"])
    assert inputs["attention_mask"].tolist()[1][:3] == [0, 0, 0] and inputs["attention_mask"][:, -1].all()
    assert model.tokenizer.padding_side == "left"  # restored to what it was (tiny tokenizers are left)
    assert not model.image_token_mask(inputs["input_ids"]).any()
    with pytest.raises(ValueError, match="no processor"):
        model.prepare(["hello"], images=[tiny_image()])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_row_equals_the_prompt_alone(family, tiny_model):
    """Left padding must not move a row's positions: GPT-2 learns absolute ones, so prepare() counts them from
    each row's first real token; rotary Llama is shift-invariant and gets no position_ids."""
    model = tiny_model(family)
    prompts = ["what color is the circle in the picture", "hello"]
    batch = model.prepare(prompts)
    assert ("position_ids" in batch) == (family == "gpt2")
    with torch.no_grad():
        together = model.hf(**batch).logits[:, -1]
        alone = torch.stack([model.hf(**model.prepare([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert "position_ids" not in model.prepare(["hello"])  # nothing padded, nothing added


def test_unknown_architecture_lists_supported():
    from haltrace.models import adapter_for

    fake = nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="bert")
    with pytest.raises(ValueError) as err:
        adapter_for(fake)
    text = str(err.value)
    for model_type in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "llama", "mistral", "gpt2"):
        assert model_type in text
    assert "'bert'" in text and "register_adapter" in text


def test_register_adapter_decorator():
    from haltrace.models.adapters import ADAPTERS, DecoderAdapter, adapter_for, register_adapter

    @register_adapter("toy_arch")
    class ToyAdapter(DecoderAdapter):
        family = "toy"

    try:
        fake = nn.Linear(2, 2)
        fake.config = SimpleNamespace(model_type="toy_arch")
        assert isinstance(adapter_for(fake), ToyAdapter)
    finally:
        ADAPTERS.pop("toy_arch")


def test_from_hf_and_flags(tiny_model):
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny

    hf_model, tok = build_tiny("gpt2")
    model = Model.from_hf(hf_model, tok, name="x", remote=True)
    assert model.processor is None and model.tokenizer is tok and model.remote and model.name_or_path == "x"
    assert model.revision is None and "gpt2" in repr(model)
    vlm = tiny_model("llava")
    assert vlm.processor is not None and vlm.tokenizer is vlm.processor.tokenizer


def test_lazy_top_level_exports():
    import haltrace
    from haltrace.models import Model, load

    assert haltrace.load is load and haltrace.Model is Model


def _save(hf_model, proc, folder):
    hf_model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_save_load_round_trip_llava(tmp_path, tiny_llava, tiny_inputs):
    import haltrace

    folder = _save(tiny_llava.hf, tiny_llava.processor, tmp_path / "tiny-llava")
    loaded = haltrace.load(str(folder), device="cpu", attn_implementation="eager")
    assert loaded.is_vlm and loaded.adapter.family == "llava" and loaded.processor is not None
    assert loaded.name_or_path == str(folder) and not loaded.remote
    inputs = loaded.prepare([IMAGE_PROMPTS["llava"], "a red " + IMAGE_PROMPTS["llava"]],
                            images=[tiny_image(0), tiny_image(1)])
    original = tiny_inputs("llava")
    assert torch.equal(inputs["input_ids"], original["input_ids"])
    hooks = ["resid_post.1", "projector_out", "attn_pattern.0"]
    a = loaded.capture(inputs, hooks, positions="last")
    b = tiny_llava.capture(original, hooks, positions="last")
    for name in hooks:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_load_text_model_and_organism_name(tmp_path, tiny_gpt2, monkeypatch):
    import haltrace

    folder = _save(tiny_gpt2.hf, tiny_gpt2.tokenizer, tmp_path / "tiny-gpt2")
    loaded = haltrace.load(str(folder), dtype="float32", remote=True)
    assert not loaded.is_vlm and loaded.processor is None and loaded.remote
    assert loaded.device.type in ("cpu", "cuda")
    # organism short names resolve through haltrace.models.shipped (HALTRACE_ARTIFACTS points elsewhere)
    _save(tiny_gpt2.hf, tiny_gpt2.tokenizer, tmp_path / "artifacts" / "organisms" / "shapes-llava")
    monkeypatch.setenv("HALTRACE_ARTIFACTS", str(tmp_path / "artifacts"))
    organism = haltrace.load("shapes-llava", device="cpu")
    assert organism.name_or_path == "shapes-llava" and organism.adapter.family == "gpt2"
    with pytest.raises(ValueError, match="unknown dtype"):
        haltrace.load(str(folder), dtype="float33")
