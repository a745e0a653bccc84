"""``haltrace explain`` on the shipped organism: captions naming the absent partner get that word marked
hallucinated (truth = the held-out set's ground truth), and every number on the page equals the library
function's value for the same token (lens over image patches, lens trajectory, attention to the image,
ProjectAway's internal confidence, a TruthPrInt gate's probability, a probe projection)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eager_organism():
    import haltrace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield haltrace.load("shapes-llava", attn_implementation="eager")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def partner_captions(eager_organism):
    """Caption-set items whose greedy caption names the absent co-occurrence partner (the first three)."""
    from haltrace.organism import tasks
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.phenomena import OrganismRunner
    from haltrace.organism.train import load_world

    world = load_world(resolve_organism("shapes-llava"))
    items = tasks.caption_set(world)[:12]
    captions = OrganismRunner(eager_organism.hf, world).captions(items)
    chosen = [ex for ex, cap in zip(items, captions, strict=True) if ex.meta["absent_partner"] in cap.split()]
    assert len(chosen) >= 3, captions
    return chosen[:3]


def _page_data(path) -> dict:
    page = path.read_text()
    block = re.search(r'<script type="application/json" class="hx-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block.replace("<\\/", "</"))


def test_absent_partner_is_marked_and_numbers_equal_the_library(eager_organism, partner_captions, tmp_path):
    from PIL import Image

    import haltrace
    from haltrace.steering.truthprint import TruthfulGate
    from haltrace.steering.vector import SteeringVector
    from haltrace.trace.attention import attention_to_image
    from haltrace.trace.lens import image_token_confidence, logit_lens

    m = eager_organism
    torch.manual_seed(0)
    d = m.hidden_size
    gate = TruthfulGate([2, 3], torch.randn(2 * d), torch.rand(2 * d) + 0.5, torch.randn(2 * d) * 0.1, 0.2,
                        torch.randn(d), alpha=1.0, threshold=0.5)
    probe = SteeringVector(direction={1: torch.randn(d), 2: torch.randn(d)}, layers=[1, 2], hidden_size=d,
                           provenance={"metrics": {"1": {"auroc": 0.7}, "2": {"auroc": 0.9}}})
    for ex in partner_captions:
        truth = sorted(ex.scene.kinds)
        started = time.perf_counter()
        exp = haltrace.explain(m, ex.image, "caption :", truth=truth, detector=gate, probe=probe)
        assert exp.data["seconds"] <= 5.0, exp.data["seconds"]
        assert time.perf_counter() - started <= 5.0
        data = _page_data(exp.save(tmp_path / f"{ex.meta['image_id']}.html"))
        answer = data["answers"][0]
        partner = ex.meta["absent_partner"]
        marked = {m_["word"]: m_["verdict"] for m_ in answer["mentions"]}
        assert marked[partner] == "hallucinated", answer["mentions"]
        assert all(marked[k] == "real" for k in truth if k in marked)
        assert partner in answer["chair"]["hallucinated"]

        # the partner's token: every number on the page against the library function on prompt + answer[:t]
        t = next(i for i, tok in enumerate(answer["tokens"]) if tok.get("word") == partner)
        tok = answer["tokens"][t]
        assert tok["verdict"] == "hallucinated"
        # inputs for prompt + the answer's first t tokens: what the model had when it produced token t
        base = m.prepare([data["prompt_text"]], images=[Image.fromarray(ex.image)])
        ids = torch.tensor([[x["id"] for x in answer["tokens"][:t]]], dtype=torch.long)
        inputs = dict(base)
        inputs["input_ids"] = torch.cat([base["input_ids"], ids], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        assert tok["position"] == inputs["input_ids"].shape[1] - 1

        img = logit_lens(m, inputs, [tok["id"]], positions="image", top_k=0)
        torch.testing.assert_close(torch.tensor(tok["patch_prob"]), img.target_probs[:, 0, :, 0], rtol=1e-4, atol=1e-6)
        assert tok["patch_rank"] == img.target_ranks[:, 0, :, 0].tolist()
        last = logit_lens(m, inputs, [tok["id"], tok["competitor"]["id"]], positions="last", top_k=0)
        assert tok["lens_rank"] == last.target_ranks[:, 0, 0, 0].tolist()
        assert tok["competitor"]["lens_rank"] == last.target_ranks[:, 0, 0, 1].tolist()
        torch.testing.assert_close(torch.tensor(tok["lens_prob"]), last.target_probs[:, 0, 0, 0], rtol=1e-4, atol=1e-6)
        air = attention_to_image(m, inputs)
        torch.testing.assert_close(torch.tensor(tok["attn_mass"]), air.per_layer[0, 0].float(), rtol=1e-4, atol=1e-6)
        assert tok["attn_baseline"] == pytest.approx(float(air.baseline[0, 0]), rel=1e-5)
        conf = image_token_confidence(m, inputs, [partner])
        mention = next(x for x in answer["mentions"] if x["word"] == partner)
        assert mention["confidence"] == pytest.approx(float(conf.confidence[0, 0]), rel=1e-4)
        assert tok["confidence"] == pytest.approx(float(conf.confidence[0, 0]), rel=1e-4)
        cap = m.capture(inputs, ["resid_post.2", "resid_post.3"], positions="last")
        feats = torch.cat([cap["resid_post.2"][0, 0], cap["resid_post.3"][0, 0]])
        assert tok["detector"] == pytest.approx(float(gate.detector.probability(feats)), rel=1e-4, abs=1e-6)
        direction = probe.for_layer(2)
        assert data["answers"][0]["probe_layer"] == 2  # the best-AUROC layer
        assert tok["probe"] == pytest.approx(float(cap["resid_post.2"][0, 0] @ direction / direction.norm()),
                                             rel=1e-4, abs=1e-5)


def test_cli_writes_the_page_and_json_with_steering(eager_organism, partner_captions, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from haltrace.cli import app
    from haltrace.steering import Add
    from haltrace.steering.registry import FittedIntervention
    from haltrace.steering.results import save_fitted

    ex = partner_captions[0]
    Image.fromarray(ex.image).save(tmp_path / "img.png")
    torch.manual_seed(1)
    save_fitted(FittedIntervention("custom", [Add("resid_post.1", torch.randn(eager_organism.hidden_size),
                                                  alpha=8.0)]), tmp_path / "fit")
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["explain", "--model", "shapes-llava", "--image", str(tmp_path / "img.png"),
                                      "--prompt", "caption :", "--truth", ",".join(sorted(ex.scene.kinds)),
                                      "--from", str(tmp_path / "fit"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert data["page"] == str(out) and out.is_file()
    assert [a["label"] for a in data["answers"]] == ["answer", "after steering (custom)"]
    assert data["steering"]["source"] == str(tmp_path / "fit")
    assert data["grid"]["views"][0]["rows"] == 4 and data["grid"]["views"][0]["cols"] == 4
    assert ex.meta["absent_partner"] in data["answers"][0]["chair"]["hallucinated"]
