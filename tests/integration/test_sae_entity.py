"""An SAE on the organism's middle layer finds entity-recognition latents that steer refusal (issue item 4).

Acceptance margins: training <= 3 min on CPU with explained variance >= 0.8 on held-out rows; adding the top
latent's decoder direction (known latent on never-seen unknown entities, unknown latent on held-out known
entities, neither used to rank it) at the entity token and after changes the refusal rate by >= 30 points,
more than random directions of the same norm at the same coefficients, and more than the mean of random
score-0 latents (the paper's baseline). Latents firing on >= 2 % of generic tokens (the image-question store)
are dropped before ranking, as the paper drops those firing on >= 2 % of Pile tokens.
"""

from __future__ import annotations

import pytest

from haltrace.organism.paths import resolve_organism

pytestmark = pytest.mark.slow

HOOK = "resid_post.2"  # the middle of the organism's 4 decoder blocks
D_SAE = 512
K = 16
# Steering coefficients in units of the mean residual norm at the entity token. The organism trained with lr 1e-3
# needs more than 2x (measured: the known latent moved refusal 20 points at 2x, 71 at 4x, random directions 13).
MULTIPLES = (0, 0.5, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def organism():
    import haltrace
    from haltrace.organism.train import load_world

    path = resolve_organism("shapes-llava")  # raises with a clear message if the checkpoint is missing
    return haltrace.load(path), load_world(path)


@pytest.fixture(scope="module")
def run(organism, tmp_path_factory):
    from haltrace.probes.sae import train_sae
    from haltrace.probes.sae_cli import harvest_organism_sae_data, organism_entity_rows
    from haltrace.probes.sae_latents import entity_refusal_experiment, score_entity_latents

    model, world = organism
    root = tmp_path_factory.mktemp("sae-entity")
    stores = harvest_organism_sae_data(model, world, HOOK, root / "acts")
    # one thread: small matrices on a shared CPU run faster without thread contention
    sae, report = train_sae(stores, HOOK, D_SAE, arch="topk", k=K, out=root / "sae", progress=False,
                            num_threads=1)
    result = score_entity_latents(sae, model, organism_entity_rows(world), store=root / "acts" / "entity", top=5,
                                  generic_stores=[stores[1]])
    experiment = entity_refusal_experiment(sae, model, result, multiples=MULTIPLES, unit="norm", n_random=5,
                                           n_random_latents=5)
    return root, report, result, experiment


def test_sae_trains_fast_and_reconstructs(run):
    _, report, _, _ = run
    print(f"\nSAE {HOOK}: {report.seconds:.1f} s, L0 {report.l0:.2f}, EV {report.explained_variance:.4f}, "
          f"dead {report.dead_latents}/{report.d_sae}, {report.steps} steps x {report.batch_size}")
    assert report.seconds <= 180
    assert report.explained_variance >= 0.8


def test_entity_latents_separate_known_from_unknown(run):
    _, _, result, _ = run
    filt, split = result["generic_filter"], result["split"]
    print(f"\ngeneric filter: dropped {filt['dropped']}/{filt['d_sae']} latents ({filt['dropped_from_top']} of the "
          f"unfiltered top 5) on {filt['n_tokens']} tokens; split {split}")
    for which in ("known", "unknown"):
        print(f"top {which} latents (latent, in-sample, held-out, generic freq): "
              f"{[(r['latent'], round(r['score'], 3), round(r['score_heldout'], 3), round(r['generic_freq'], 4)) for r in result[which]]}")
    assert result["known"][0]["score"] > 0 and result["unknown"][0]["score"] > 0
    # the filter ran on the image questions' tokens and no listed latent fires on >= 2 % of them
    assert filt["max_freq"] == 0.02 and filt["n_tokens"] > 10_000 and filt["dropped"] > 0
    assert all(r["generic_freq"] < 0.02 for which in ("known", "unknown") for r in result[which])
    # selection and held-out entities are disjoint halves
    assert split["selection"]["entities"] > 0 and split["heldout"]["entities"] > 0
    assert not any(s and h for s, h in zip(result["_selection"], result["_heldout"], strict=True))


def test_steering_with_entity_latents_changes_refusal(run):
    _, _, _, experiment = run
    known = experiment["known_latent_on_unknown_heldout"]
    unknown = experiment["unknown_latent_on_known"]
    for name, exp in (("known latent on never-seen unknown", known), ("unknown latent on held-out known", unknown)):
        print(f"\n{name} (n={exp['n']}): coefs {[round(c, 2) for c in exp['coefs']]} refusal {exp['refusal']} "
              f"(in-sample n={exp['n_in_sample']}: {exp['refusal_in_sample']}); change {exp['change_points']:+.1f} "
              f"(in-sample {exp['change_points_in_sample']:+.1f}); random directions "
              f"{exp['random_change_points']:+.1f}; random latents {exp['random_latents']} "
              f"{exp['random_latents_change_points']:+.1f} ± {exp['random_latents_change_points_std']:.1f}")
    assert "held-out known" in unknown["target"] and unknown["n"] == 48  # half of the 96 known questions
    for exp in (known, unknown):
        assert len(exp["random_latents"]) == 5 and exp["random_latents_max_abs_score"] == 0.0
        assert exp["latent"] not in exp["random_latents"]
    # at least one of the two latents moves refusal by >= 30 points in its intended direction; random directions
    # of the same norm at the same coefficients move it by at most half as much, and random score-0 latents less
    # on average (measured, seed 0: known latent -49 points, random directions -13, random latents -24 ± 27)
    moved = [(abs(e["change_points"]), abs(e["random_change_points"]), abs(e["random_latents_change_points"]))
             for e in (known, unknown)]
    assert any(change >= 30 and rand <= change / 2 and lat < change for change, rand, lat in moved), moved


def test_cli_latents_reuses_the_store_and_writes_vectors(run):
    import json

    from typer.testing import CliRunner

    from haltrace.probes.sae_cli import app
    from haltrace.steering.vector import SteeringVector

    root, _, result, _ = run
    out = CliRunner().invoke(app, ["latents", "--sae", str(root / "sae"), "--store", str(root / "acts" / "entity"),
                                   "--top", "3", "--vectors", str(root / "vectors"), "--json"])
    assert out.exit_code == 0, out.output
    # stdout only: transformers' weight-loading progress bar goes to stderr without a newline
    line = next((line for line in out.stdout.splitlines() if line.startswith("{")), None)
    assert line is not None, f"no JSON object in the output:\n{out.output[-3000:]}"
    payload = json.loads(line)
    assert payload["known"][0]["latent"] == result["known"][0]["latent"]
    # by default the generic tokens are the SAE's other training store: the image questions
    assert str(root / "acts" / "image") in payload["generic_filter"]["source"]
    assert payload["generic_filter"]["dropped"] == result["generic_filter"]["dropped"]
    assert payload["unknown"][0]["score_heldout"] == pytest.approx(result["unknown"][0]["score_heldout"])
    vec = SteeringVector.load(payload["vectors"]["unknown"])
    assert vec.method == "sae" and vec.layers == [int(HOOK.split(".")[1])]
    assert vec.alpha == pytest.approx(result["unknown"][0]["scale"])


def test_unsteered_answers_match_the_organism_runner(organism, run):
    from haltrace.organism.phenomena import OrganismRunner
    from haltrace.organism.tasks import entity_sets
    from haltrace.probes.sae_latents import steered_answers

    model, world = organism
    _, _, result, _ = run
    examples = entity_sets(world)["known"][:32]
    rows = [r for r in result["_rows"] if r["group"] == "known"][:32]
    positions = [p for r, p in zip(result["_rows"], result["_positions"], strict=True) if r["group"] == "known"][:32]
    assert [r["prompt"] for r in rows] == [e.prompt for e in examples]
    plain = steered_answers(model, [r["prompt"] for r in rows], positions, HOOK, None)
    assert plain == OrganismRunner(model.hf, world).answers(examples)
