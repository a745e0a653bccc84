"""The loop on a user's model and files: an organism copy *without* world.json (so nothing organism-specific can
be used) goes through the benchmark files and fit files that ``haltrace organism eval --write-sets`` writes, and
must give exactly what the built-in organism path gives: the same POPE and CHAIR figures, the same fitted
tensors for every method that fits on data, and the same before/after figures under ``haltrace steer``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

METHODS_WITH_DATA = ("caa", "erasure", "iti", "pvp", "truthprint", "vhr", "vti")


@pytest.fixture(scope="module")
def organism(shipped_organism):
    return shipped_organism


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from haltrace.organism.export_sets import write_eval_sets
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world

    out = tmp_path_factory.mktemp("sets")
    write_eval_sets(load_world(resolve_organism("shapes-llava")), out)
    return out


@pytest.fixture(scope="module")
def copy_folder(tmp_path_factory):
    """The shipped organism's files minus world.json: to haltrace it is just a LLaVA checkpoint."""
    from haltrace.organism.paths import resolve_organism

    dst = tmp_path_factory.mktemp("user-model") / "my-llava"
    shutil.copytree(resolve_organism("shapes-llava"), dst)
    (dst / "world.json").unlink()
    return dst


@pytest.fixture(scope="module")
def user_model(copy_folder, shipped_organism):
    import haltrace
    from haltrace.organism.paths import organism_world

    model = haltrace.load(str(copy_folder))
    assert organism_world(model) is None  # nothing can reach the organism's world
    return model


def test_written_sets_hold_plain_questions(sets):
    row = json.loads((sets / "pope" / "pope_adversarial.jsonl").read_text().splitlines()[0])
    assert set(row) == {"question_id", "image", "text", "label"}
    assert row["text"].endswith("?") and "answer" not in row["text"] and "<image>" not in row["text"]
    for method in METHODS_WITH_DATA:
        assert (sets / "fit" / f"{method}.jsonl").is_file()
    assert {p.name for p in (sets / "chair" / "annotations").iterdir()} == {"instances_organism.json",
                                                                          "captions_organism.json"}


def test_pope_and_chair_files_give_the_organism_figures(organism, user_model, sets, tmp_path):
    from haltrace.evals.benchmarks import chair_images, run_captions, run_pope
    from haltrace.evals.coco import coco_image_files, load_coco_ground_truth, score_chair
    from haltrace.evals.runner import GenerationSettings
    from haltrace.organism import phenomena
    from haltrace.organism.paths import organism_world

    runner = phenomena.OrganismRunner(organism.hf, organism_world(organism))
    pope, _, _ = phenomena.eval_pope(runner)
    chair = phenomena.eval_chair(runner)
    settings = GenerationSettings(max_new_tokens=10, batch_size=64)
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    for split in ("adversarial", "random"):
        got = run_pope(user_model, sets / "pope" / f"pope_{split}.jsonl", sets / "images", tmp_path, settings)
        assert {k: got[k] for k in keys} == {k: pope[split][k] for k in keys}, split
    annotations = sets / "chair" / "annotations"
    picked = chair_images(sets / "images", coco_image_files(annotations), None)
    assert len(picked) == chair["n"]
    rows = run_captions(user_model, picked, tmp_path / "captions.jsonl", prompt="caption :", settings=settings)
    truth = load_coco_ground_truth(annotations, image_ids=[i for i, _ in picked])
    got = score_chair({r["image_id"]: r["caption"] for r in rows}, truth)
    assert got["rules"] == "official" and got["synonyms"] == "category names"
    for key in ("chair_s", "chair_i", "recall", "mean_length", "mentions", "hallucinated"):
        assert got[key] == chair[key], key


def _tensors(fitted, folder: Path) -> dict[str, torch.Tensor]:
    from haltrace.steering.results import save_fitted

    return load_file(str(save_fitted(fitted, folder)["safetensors"]))


@pytest.mark.parametrize("method", METHODS_WITH_DATA)
def test_fit_from_jsonl_equals_the_builtin_fit(organism, user_model, sets, tmp_path, method):
    from haltrace.data import load_items
    from haltrace.steering.registry import get_method

    # a plain checkpoint has no default data (VHR's per-sample heads, the paper's method, need none: its fixed mode)
    with pytest.raises(ValueError, match="needs fit data"):
        get_method(method).fit(user_model, **({"heads": "fixed"} if method == "vhr" else {}))
    builtin = get_method(method).fit(organism)
    items = load_items(sets / "fit" / f"{method}.jsonl", images=sets / "images")
    mine = get_method(method).fit(user_model, items)
    a, b = _tensors(builtin, tmp_path / "a"), _tensors(mine, tmp_path / "b")
    assert a and a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key
    assert builtin.provenance["data"]["fingerprint"] == mine.provenance["data"]["fingerprint"]


def test_steer_cli_on_user_files_matches_the_builtin_path(copy_folder, sets, tmp_path, shipped_organism):
    from haltrace.cli import app

    runner = CliRunner()
    builtin = runner.invoke(app, ["steer", "--method", "caa", "--eval", "pope", "--json"])
    assert builtin.exit_code == 0, builtin.output
    mine = runner.invoke(app, ["steer", "--model", str(copy_folder), "--method", "caa", "--fit-data",
                               str(sets / "fit" / "caa.jsonl"), "--images", str(sets / "images"), "--eval",
                               f"pope={sets / 'pope' / 'pope_adversarial.jsonl'}", "--out", str(tmp_path / "run"),
                               "--json"])
    assert mine.exit_code == 0, mine.output
    a, b = json.loads(builtin.stdout), json.loads(mine.stdout)
    for phase in ("before", "after"):
        x, y = a[phase]["pope"]["adversarial"], b[phase]["pope"]["pope_adversarial"]
        assert {k: x[k] for k in ("accuracy", "recall", "f1", "yes_ratio")} == \
               {k: y[k] for k in ("accuracy", "recall", "f1", "yes_ratio")}, phase
    assert (tmp_path / "run" / "answers" / "after" / "pope" / "pope_adversarial.answers.jsonl").is_file()
    assert (tmp_path / "run" / "intervention.safetensors").is_file()
