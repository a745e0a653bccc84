"""Logit lens against the model's own logits, brute-force ranks, and chunked == unchunked."""

from __future__ import annotations

import pytest
import torch

from haltrace.trace.lens import image_token_confidence, logit_lens, project, target_token_ids

FAMILIES = ["llava", "llama", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_reproduces_model_logits(family, tiny_model, tiny_inputs):
    model, inputs = tiny_model(family), tiny_inputs(family)
    res = logit_lens(model, inputs, ["red", "blue"], positions="all", return_logits=True, vocab_chunk=17)
    with torch.no_grad():
        want = model.hf(**inputs).logits.float()
    assert res.layers == [f"resid_post.{i}" for i in range(model.n_layers)]
    torch.testing.assert_close(res.logits[-1], want, atol=1e-4, rtol=0)
    # the streamed normaliser and top-1 agree with the full softmax
    torch.testing.assert_close(res.log_normaliser[-1], torch.logsumexp(want, -1), atol=1e-4, rtol=0)
    assert torch.equal(res.top_ids[-1, ..., 0], want.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_ranks_match_bruteforce_and_chunking(family, tiny_model, tiny_inputs):
    model, inputs = tiny_model(family), tiny_inputs(family)
    words = ["red", "blue", "circle", "the"]
    full = logit_lens(model, inputs, words, positions=[-1, -2], return_logits=True, vocab_chunk=10**6, top_k=5)
    chunked = logit_lens(model, inputs, words, positions=[-1, -2], vocab_chunk=7, top_k=5)
    logits = full.logits  # [L, B, P, V]
    ids = torch.tensor(full.target_ids)
    # brute force: position of the target in a descending argsort, ties broken against the target
    for idx, tid in enumerate(ids.tolist()):
        t = logits[..., tid:tid + 1]
        assert torch.equal(full.target_ranks[..., idx], (logits > t).sum(-1))
    order = logits.argsort(-1, descending=True)
    assert torch.equal(full.target_ranks == 0, order[..., :1] == ids)
    assert torch.equal(chunked.target_ranks, full.target_ranks)
    torch.testing.assert_close(chunked.target_logprobs, full.target_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.target_logprobs, torch.log_softmax(logits, -1)[..., ids], atol=1e-5, rtol=0)
    assert torch.equal(chunked.top_ids, full.top_ids)
    assert torch.equal(full.top_ids, order[..., :5])
    assert bool((chunked.top_probs.sum(-1) <= 1 + 1e-6).all())


def test_norm_is_recomputed_per_layer_and_can_be_skipped(tiny_llama, tiny_inputs):
    inputs = tiny_inputs("llama")
    normed = logit_lens(tiny_llama, inputs, return_logits=True, top_k=1)
    raw = logit_lens(tiny_llama, inputs, return_logits=True, top_k=1, apply_norm=False)
    cap = tiny_llama.capture(inputs, ["resid_post.0"], positions="last")
    head, norm = tiny_llama.adapter.unembed, tiny_llama.adapter.final_norm
    with torch.no_grad():
        torch.testing.assert_close(normed.logits[0], head(norm(cap["resid_post.0"])), atol=1e-5, rtol=0)
        torch.testing.assert_close(raw.logits[0], head(cap["resid_post.0"]), atol=1e-5, rtol=0)
    pre = logit_lens(tiny_llama, inputs, layers=[0], stream="resid_pre", top_k=1, return_logits=True)
    assert pre.layers == ["resid_pre.0"]


def test_targets_first_token_and_errors(tiny_llama):
    firsts, pieces = target_token_ids(tiny_llama.tokenizer, ["red", "blue green", 5])
    vocab = tiny_llama.tokenizer.convert_tokens_to_ids
    assert firsts == [vocab("red"), vocab("blue"), 5]
    assert pieces[1] == [vocab("blue"), vocab("green")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        target_token_ids(tiny_llama.tokenizer, ["zebra"])
    with pytest.raises(ValueError, match="layers"):
        logit_lens(tiny_llama, tiny_llama.prepare(["a red"]), layers=[5])
    with pytest.raises(ValueError, match="stream"):
        logit_lens(tiny_llama, tiny_llama.prepare(["a red"]), stream="mlp_out")


def test_project_any_leading_shape(tiny_gpt2):
    resid = torch.randn(3, 2, 4, tiny_gpt2.hidden_size)
    res = project(tiny_gpt2, resid, ["red"], top_k=3, vocab_chunk=9)
    assert res.top_ids.shape == (3, 2, 4, 3) and res.target_ranks.shape == (3, 2, 4, 1)


def test_image_token_confidence(tiny_llava, tiny_gpt2, tiny_inputs):
    inputs = tiny_inputs("llava")
    conf = image_token_confidence(tiny_llava, inputs, ["red", "circle"], vocab_chunk=11)
    lens = logit_lens(tiny_llava, inputs, ["red", "circle"], positions="image", return_logits=True)
    probs = torch.softmax(lens.logits, -1)[..., lens.target_ids]  # [L, B, I, T]
    want = probs.permute(1, 3, 0, 2).flatten(2).max(-1).values
    torch.testing.assert_close(conf.confidence, want, atol=1e-6, rtol=0)
    mask = tiny_llava.image_token_mask(inputs["input_ids"])
    assert bool(mask.gather(1, conf.position).all())  # the argmax sits on an image token
    assert set(conf.as_dict(0)) == {"red", "circle"}
    with pytest.raises(ValueError, match="vision-language"):
        image_token_confidence(tiny_gpt2, {}, ["red"])


def _plot_data(html: str) -> str:
    """The ``Plotly.newPlot(...)`` call of a written figure (data and layout), without the inlined library."""
    import re

    assert not re.search(r"<script[^>]+src=[\"'][^\"']*cdn\.plot\.ly", html), "figure must not load plotly from a CDN"
    return html[html.rindex("Plotly.newPlot("):]


def test_rank_heatmap_html(tiny_llama, tiny_inputs, tmp_path):
    from haltrace.viz import rank_heatmap, write_html

    res = logit_lens(tiny_llama, tiny_inputs("llama"), ["red", "blue"])
    ranks = res.target_ranks[:, 0, -1]  # [L, T]
    path = write_html(rank_heatmap(ranks, res.layers, res.targets), tmp_path / "sub" / "lens.html")
    data = _plot_data(path.read_text())
    assert "resid_post.1" in data and '"blue"' in data
    assert f"[{int(ranks[0, 0])},{int(ranks[0, 1])}]" in data.replace(" ", "")
    assert [p.name for p in path.parent.iterdir()] == ["lens.html"]  # no temp file left behind
