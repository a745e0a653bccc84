"""Attention-to-image ratio against eager ``output_attentions=True`` weights, and the sdpa error."""

from __future__ import annotations

import pytest
import torch

from haltrace.trace.attention import attention_to_image

VLMS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3"]


def _direct(model, inputs, pos):
    with torch.no_grad():
        attns = model.hf(**inputs, output_attentions=True).attentions  # n_layers x [B, H, T, T]
    mask = model.image_token_mask(inputs["input_ids"]).float()
    out = []
    for a in attns:
        rows = torch.stack([a[b, :, pos[b], :] for b in range(a.shape[0])])  # [B, H, P, T]
        out.append(torch.einsum("bhpt,bt->bph", rows.float(), mask))
    return torch.stack(out, dim=2)  # [B, P, L, H]


@pytest.mark.parametrize("family", VLMS)
def test_matches_output_attentions(family, tiny_model, tiny_inputs):
    model, inputs = tiny_model(family), tiny_inputs(family)
    air = attention_to_image(model, inputs)
    assert air.ratio.shape == (2, 1, model.n_layers, model.n_heads)
    torch.testing.assert_close(air.ratio, _direct(model, inputs, air.positions), atol=1e-5, rtol=0)
    assert bool((air.ratio >= 0).all() and (air.ratio <= 1 + 1e-5).all())
    assert air.per_layer.shape == (2, 1, model.n_layers)


def test_positions_and_layers(tiny_llava, tiny_inputs):
    inputs = tiny_inputs("llava")
    air = attention_to_image(tiny_llava, inputs, positions=[-1, -3], layers=[-1])
    want = _direct(tiny_llava, inputs, air.positions)[:, :, -1:]
    torch.testing.assert_close(air.ratio, want, atol=1e-5, rtol=0)
    assert air.layers == [tiny_llava.n_layers - 1]
    n_img = tiny_llava.image_token_mask(inputs["input_ids"]).sum(-1)
    assert torch.equal(air.n_image, n_img)
    assert bool((air.baseline > 0).all() and (air.baseline < 1).all())


def test_sdpa_gives_clear_error(tiny_model, tiny_inputs):
    model = tiny_model("llava", "sdpa")
    with pytest.raises(ValueError, match=r'attn_implementation="eager"'):
        attention_to_image(model, tiny_inputs("llava"))


def test_no_image_tokens(tiny_llama, tiny_inputs):
    with pytest.raises(ValueError, match="no image tokens"):
        attention_to_image(tiny_llama, tiny_inputs("llama"))


def test_image_attention_heatmap_html(tiny_llava, tiny_inputs, tmp_path):
    import re

    from haltrace.viz import image_attention_heatmap, write_html

    air = attention_to_image(tiny_llava, tiny_inputs("llava"))
    path = write_html(image_attention_heatmap(air.ratio[0, 0]), tmp_path / "air.html")
    html = path.read_text()
    assert not re.search(r"<script[^>]+src=[\"'][^\"']*cdn\.plot\.ly", html)
    data = html[html.rindex("Plotly.newPlot("):]
    assert repr(float(air.ratio[0, 0, 0, 0])) in data and "head 3" in data
