"""haltrace.explain on tiny random models of every VLM family: the maps take the family's patch grid, a text-only
prompt says there is no map, steering marks changed words, and the page is one self-contained file."""

from __future__ import annotations

import json
import re

import pytest
import torch

from haltrace.models.grids import gemma3_grid, square_grid
from haltrace.models.tiny import IMAGE_PROMPTS, tiny_image

# family -> the grid views the tiny model's prompt must give (rows, cols) per view
EXPECTED = {
    "llava": [(2, 2)],                 # 28 px / patch 14, CLS dropped
    "llava_next": [(2, 2), (2, 2)],    # base view + one 28x28 tile (its rows end with image_newline)
    "qwen2_vl": [(2, 2)],              # 56 px -> 4x4 patches, merge 2
    "qwen2_5_vl": [(2, 2)],
    "gemma3": [(2, 2)],                # mm_tokens_per_image = 4 pooled tokens
}


def _data_of(page: str) -> dict:
    block = re.search(r'<script type="application/json" class="hx-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block.replace("<\\/", "</"))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_maps_take_the_family_grid(tiny_model, family):
    import haltrace

    model = tiny_model(family)
    image = tiny_image(0, size=56 if family.startswith("qwen") else 28)
    ex = haltrace.explain(model, image, IMAGE_PROMPTS[family], max_new_tokens=3)
    grid = ex.grid
    assert grid["spatial"], grid["note"]
    assert [(v["rows"], v["cols"]) for v in grid["views"]] == EXPECTED[family]
    n_img = grid["n_image_tokens"]
    assert n_img == int(model.image_token_mask(model.prepare([ex.data["prompt_text"]], images=[image])
                                                ["input_ids"]).sum())
    cells = sorted(c for v in grid["views"] for row in v["cells"] for c in row if c >= 0)
    assert len(cells) == len(set(cells)) and all(0 <= c < n_img for c in cells)
    if family == "llava_next":  # 4 base + 2 rows x (2 + newline): the newline tokens are not cells
        assert n_img == 10 and cells == [0, 1, 2, 3, 4, 5, 7, 8]
    for tok in ex.tokens:
        assert len(tok["patch_prob"]) == model.n_layers and all(len(r) == n_img for r in tok["patch_prob"])
        assert len(tok["attn_patch"][0]) == n_img and len(tok["lens_rank"]) == model.n_layers
        assert abs(sum(tok["attn_patch"][0]) - tok["attn_mass"][0]) < 1e-4
    assert [len(r) for r in ex.map(0, view=len(EXPECTED[family]) - 1)] == [EXPECTED[family][-1][1]] * \
        EXPECTED[family][-1][0]
    page = ex.to_html()
    assert _data_of(page)["grid"] == grid


def test_text_only_prompt_says_there_is_no_map(tiny_model):
    import haltrace

    ex = haltrace.explain(tiny_model("llama"), None, "what color is the", max_new_tokens=2)
    assert not ex.grid["spatial"] and "text-only" in ex.grid["note"]
    assert "patch_prob" not in ex.tokens[0] and ex.tokens[0]["lens_rank"]
    assert "No map over the image" in ex.to_html()
    with pytest.raises(ValueError, match="no spatial grid"):
        ex.map(0)


def test_a_layout_that_does_not_fit_draws_no_map():
    assert not square_grid(10).spatial and "square" in square_grid(10).note

    class Cfg:
        mm_tokens_per_image = 256

    g = gemma3_grid(Cfg(), 512)  # pan-and-scan crops: not placed, said so
    assert not g.spatial and "pan-and-scan" in g.note


def test_steering_marks_changed_words_and_page_is_self_contained(tiny_model, tmp_path):
    import haltrace
    from haltrace.steering import Add
    from haltrace.steering.registry import FittedIntervention

    model = tiny_model("llava")
    torch.manual_seed(3)
    fitted = FittedIntervention("custom", [Add("resid_post.0", torch.randn(model.hidden_size), alpha=40.0)])
    ex = haltrace.explain(model, tiny_image(1), IMAGE_PROMPTS["llava"], fitted=fitted, max_new_tokens=4)
    before, after = ex.answers
    assert after["label"].startswith("after steering") and ex.data["steering"]["method"] == "custom"
    assert before["text"] != after["text"]
    assert any(t["changed"] for t in after["tokens"]) and "changed" in before["tokens"][0]
    page = ex.save(tmp_path / "p.html").read_text()
    # nothing is fetched: no external script or stylesheet, plotly.js inlined exactly once
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    assert page.count("window.haltraceExplain = window.haltraceExplain") == 1
    assert "<iframe srcdoc=" in ex._repr_html_()
