"""The explain page in a real browser: headless Debian chromium opens the page from a file, the console shows no
errors, the figures exist in the DOM, clicking another token changes the shown map, and a screenshot is written
to ``out/explain/`` for people to look at. Without chromium (``.ci/run`` installs it) the test is skipped and
says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.cdp import Browser, find_chromium

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "explain"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of a caption naming an absent partner, with a steered answer next to it."""
    import haltrace
    from haltrace.organism import tasks
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world
    from haltrace.steering import Add
    from haltrace.steering.registry import FittedIntervention

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = haltrace.load("shapes-llava", attn_implementation="eager")
        ex = tasks.caption_set(load_world(resolve_organism("shapes-llava")))[1]  # a knife; the caption adds a fork
        torch.manual_seed(1)
        fitted = FittedIntervention("custom", [Add("resid_post.1", torch.randn(model.hidden_size), alpha=8.0)])
        exp = haltrace.explain(model, ex.image, "caption :", truth=sorted(ex.scene.kinds), fitted=fitted,
                               title="haltrace explain: a caption naming the absent partner")
    finally:
        torch.set_num_threads(threads)
    return exp, exp.save(tmp_path_factory.mktemp("explain") / "page.html")


def test_page_in_headless_chromium(page):
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it): the browser test "
                    "did not run")
    exp, path = page
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Browser.start(exe) as b:
        b.open(path.resolve().as_uri())
        b.drain(0.5)
        assert b.errors == [], b.errors
        n_figs = b.eval("document.querySelectorAll('#hx-main .js-plotly-plot').length")
        assert n_figs == 4  # lens map, attention map, lens curve, attention curve
        assert b.eval("document.querySelectorAll('#hx-main .map-lens .heatmaplayer .hm, #hx-main .map-lens image')"
                      ".length") >= 1
        n_tokens = [len(a["tokens"]) for a in exp.answers]
        assert b.eval("document.querySelectorAll('#hx-main .strip .tok').length") == sum(n_tokens)
        assert b.eval("document.querySelectorAll('#hx-main .tok.hallucinated').length") >= 1
        start = int(b.eval("document.getElementById('hx-main').dataset.token"))
        z_of = "JSON.stringify(document.querySelector('#hx-main .map-lens').data[1].z)"
        before = json.loads(b.eval(z_of))
        shown = exp.map(start)  # the page opens on the first hallucinated word, at the default layer
        assert before == shown
        other = next(i for i in range(n_tokens[0]) if i != start)
        b.eval(f"document.querySelector('#hx-main .strip[data-answer=\"0\"] .tok[data-token=\"{other}\"]').click()")
        after = json.loads(b.eval(z_of))
        assert after != before and after == exp.map(other)
        assert int(b.eval("document.getElementById('hx-main').dataset.token")) == other
        # the layer slider redraws too
        b.eval("const s = document.querySelector('#hx-main .sel-layer'); s.value = 0; "
               "s.dispatchEvent(new Event('input'))")
        assert json.loads(b.eval(z_of)) == exp.map(other, layer=0)
        b.eval(f"document.querySelector('#hx-main .strip[data-answer=\"0\"] .tok[data-token=\"{start}\"]').click()")
        b.eval("const s2 = document.querySelector('#hx-main .sel-layer'); s2.value = "
               f"{exp.data['default_layer']}; s2.dispatchEvent(new Event('input'))")
        b.drain(0.3)
        assert b.errors == [], b.errors
        shot = b.screenshot(SHOTS / "explain_organism.png")
    assert shot.stat().st_size > 10_000
