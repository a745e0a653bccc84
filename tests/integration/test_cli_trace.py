"""``haltrace trace`` / ``haltrace lens`` end to end with typer's CliRunner, on a tiny llava saved to disk."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from haltrace.cli import app

PROMPT = "<image> what color is the circle"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(model folder, image file) for a tiny random llava written with save_pretrained."""
    from haltrace.models.tiny import build_tiny, tiny_image

    root = tmp_path_factory.mktemp("cli")
    hf_model, proc = build_tiny("llava")
    hf_model.save_pretrained(root / "tiny-llava")
    proc.save_pretrained(root / "tiny-llava")
    tiny_image(0).save(root / "img.png")
    return root / "tiny-llava", root / "img.png"


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _no_cdn(html: str) -> None:
    assert not re.search(r"<script[^>]+src=[\"'][^\"']*cdn\.plot\.ly", html)


def test_trace_json_safetensors_and_attention(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    import haltrace

    model_dir, image = tiny_dir
    out = tmp_path / "acts"
    res = _run("trace", "--model", model_dir, "--prompt", PROMPT, "--image", image, "--hooks",
               "resid_post.*,attn_out.1", "--out", out, "--json", "--attention-to-image")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report["hooks"]) == {"resid_post.0", "resid_post.1", "attn_out.1"}
    assert report["hooks"]["resid_post.1"]["shape"] == [1, 1, 32]
    assert len(report["attention_to_image"]["by_head"]) == 2
    tensors = load_file(out / "activations.safetensors")
    sidecar = json.loads((out / "activations.json").read_text())
    assert sidecar["shapes"]["attn_out.1"] == [1, 1, 32] and sidecar["tokens"][0] == "<image>"
    model = haltrace.load(str(model_dir), device="cpu")
    from PIL import Image

    inputs = model.prepare([PROMPT], images=[Image.open(image).convert("RGB")])
    want = model.capture(inputs, ["resid_post.1"], positions="last")["resid_post.1"]
    torch.testing.assert_close(tensors["resid_post.1"], want, atol=1e-5, rtol=0)
    # the human-readable form prints tables
    res = _run("trace", "--model", model_dir, "--prompt", PROMPT, "--image", image, "--hooks", "mlp_out.0")
    assert res.exit_code == 0, res.output
    assert "mlp_out.0" in res.stdout and "mean L2 norm" in res.stdout


def test_trace_errors(tiny_dir):
    model_dir, image = tiny_dir
    res = _run("trace", "--model", model_dir, "--prompt", PROMPT, "--image", image, "--hooks", "resid_psot.0")
    assert res.exit_code == 2 and "valid hooks" in res.output
    res = _run("trace", "--model", model_dir, "--prompt", PROMPT, "--image", "/nonexistent/img.png")
    assert res.exit_code == 2 and "image file not found" in res.output


def test_lens_prompt(tiny_dir, tmp_path):
    model_dir, image = tiny_dir
    html = tmp_path / "lens.html"
    res = _run("lens", "--model", model_dir, "--prompt", PROMPT, "--image", image, "--targets", "red,blue",
               "--json", "--html", html)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["layers"] == ["resid_post.0", "resid_post.1"]
    assert len(report["target_ranks"]) == 2 and len(report["target_ranks"][0][0]) == 2
    _no_cdn(html.read_text())
    res = _run("lens", "--model", model_dir, "--prompt", "what color is the circle", "--positions", "all")
    assert res.exit_code == 0 and "resid_post.1" in res.stdout
    res = _run("lens", "--model", model_dir, "--prompt", PROMPT, "--image", image, "--targets", "zebra")
    assert res.exit_code == 2 and "not in the vocabulary" in res.output
    res = _run("lens", "--model", model_dir)
    assert res.exit_code == 2 and "--prompt or --task" in res.output


def test_lens_counterfactual_task(tmp_path):
    # the shipped organism (the command's default), on the first 60 held-out counterfactual items
    html = tmp_path / "pvp.html"
    res = _run("lens", "--task", "counterfactual-color", "--n", "60", "--batch-size", "16", "--json", "--html", html)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    leads = report["prior_leads_by_layer"]
    assert report["n"] == 60 and len(leads) == len(report["layers"])
    assert all(0 <= v <= 1 for v in leads)
    # the prior colour leads early and the pixel colour late (the organism's design: see test_organism_phenomena)
    assert leads[0] >= 0.6 and leads[-1] <= 0.5, leads
    data = html.read_text()
    _no_cdn(data)
    assert repr(report["prior_leads_by_layer"][0]) in data[data.rindex("Plotly.newPlot("):]
