"""SAE training from an activation store, loading checks, separation scores and latent steering (tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

PROMPTS = [f"{a} {b} {c} is {d}" for a in ("the", "a", "what") for b in ("red", "green", "blue", "black")
           for c in ("circle", "square", "star") for d in ("left", "right", "top")]  # 108 prompts


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_gpt2):
    import haltrace

    out = tmp_path_factory.mktemp("sae") / "acts"
    haltrace.harvest(tiny_gpt2, [{"prompt": p} for p in PROMPTS], ["resid_post.0", "resid_post.1"],
                     positions="all", out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(store_dir, tmp_path_factory):
    from haltrace.probes.sae import train_sae

    out = tmp_path_factory.mktemp("sae-out") / "sae"
    # one thread: the matrices are tiny, and on a shared CPU more threads only contend
    sae, report = train_sae(store_dir, "resid_post.1", d_sae=64, arch="relu", l1_coefficient=1.0, steps=300,
                            batch_size=64, out=out, progress=False, num_threads=1)
    return sae, report, out


def test_training_reports_metrics_and_saves_sae_lens_format(trained):
    from sae_lens import SAE

    sae, report, out = trained
    assert report.d_in == 32 and report.d_sae == 64 and report.steps == 300
    assert report.heldout_rows > 0 and report.train_rows > report.heldout_rows
    assert 0 < report.l0 < 64
    assert math.isfinite(report.explained_variance) and report.explained_variance > 0.5
    assert 0 <= report.dead_latents <= 64
    loaded = SAE.load_from_disk(out)
    meta = loaded.cfg.metadata
    assert meta.hook_name == "blocks.1.hook_resid_post" and meta.haltrace_hook == "resid_post.1"
    assert meta.model_name == "tiny-gpt2" and "hidden_states[i+1]" in meta.layer_convention
    assert json.loads((out / "haltrace_train.json").read_text())["explained_variance"] == report.explained_variance
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the temp folder was renamed away
    x = torch.randn(5, 32)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)


def test_metrics_match_definitions(trained):
    from haltrace.probes.sae import sae_metrics

    sae, _, _ = trained
    x = torch.randn(50, 32) * 3
    m = sae_metrics(sae, x)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    ev = 1 - ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-4)
    assert m["l0"] == pytest.approx(float((acts > 0).sum(1).float().mean()))
    assert m["dead_latents"] == int((~(acts > 0).any(0)).sum())


def test_save_refuses_to_overwrite(trained, store_dir):
    from haltrace.probes.sae import SAEError, train_sae

    _, _, out = trained
    with pytest.raises(SAEError, match="already exists"):
        train_sae(store_dir, "resid_post.1", d_sae=8, steps=1, batch_size=8, out=out, progress=False)


def test_store_without_the_hook_lists_its_hooks(store_dir):
    from haltrace.probes.sae import SAEError, train_sae

    with pytest.raises(SAEError, match=r"no hook 'mlp_out\.1'.*resid_post\.0.*resid_post\.1"):
        train_sae(store_dir, "mlp_out.1", d_sae=8, steps=1, progress=False)
    with pytest.raises(SAEError, match="not one d_model vector"):
        train_sae(store_dir, "head_out.1", d_sae=8, steps=1, progress=False)


def test_sampler_holds_out_examples_and_cycles(store_dir):
    from haltrace.probes.sae import StoreSampler, open_stores

    stores = open_stores(store_dir, "resid_post.0")
    sampler = StoreSampler(stores, "resid_post.0", batch_size=100, heldout_every=10)
    full = stores[0].load("resid_post.0")
    assert sampler.count() + sampler.count(heldout=True) == full.shape[0]
    held = sampler.heldout()
    lengths = stores[0].lengths()
    assert held.shape[0] == int(lengths[::10].sum())
    train_rows = sampler.count()
    batches = [next(sampler) for _ in range(2 * train_rows // 100 + 2)]  # more than two epochs
    assert all(b.shape == (100, 32) for b in batches) and sampler.epochs >= 2
    # served rows come from training examples only (identical prefixes give identical rows, so compare sets)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    train = full[owner % 10 != 0]
    served = torch.cat(batches)

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

    assert bool((dist(served, train).min(1).values < 1e-6).all())
    only_held = held[dist(held, train).min(1).values > 1e-6]
    assert only_held.shape[0] > 0 and not bool((dist(only_held, served) < 1e-6).any())


def test_d_in_mismatch_names_both_sizes(tiny_gpt2):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from haltrace.probes.sae import SAEError, check_sae_fits

    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with pytest.raises(SAEError, match=r"d_in=16.*'resid_post\.1'.*32 wide"):
        check_sae_fits(sae, tiny_gpt2)
    ok = StandardSAE(StandardSAEConfig(d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    assert check_sae_fits(ok, tiny_gpt2) == "resid_post.1"
    far = StandardSAE(StandardSAEConfig(d_in=32, d_sae=8, metadata=SAEMetadata(hook_name="blocks.7.hook_resid_post")))
    with pytest.raises(SAEError, match="does not exist"):
        check_sae_fits(far, tiny_gpt2)


def test_hook_name_mapping():
    from haltrace.probes.sae import SAEError, haltrace_hook_name, tl_hook_name

    for name in ("resid_pre.0", "resid_post.3", "attn_out.2", "mlp_out.1"):
        assert haltrace_hook_name(tl_hook_name(name)) == name
    assert haltrace_hook_name("blocks.9.hook_resid_post") == "resid_post.9"
    with pytest.raises(SAEError, match="no haltrace equivalent"):
        haltrace_hook_name("blocks.1.ln1.hook_normalized")


def test_load_errors(tmp_path, monkeypatch):
    from haltrace.probes.sae import SAEError, load_sae

    with pytest.raises(SAEError, match="cfg.json is missing"):
        load_sae(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEError, match="network access.*HF cache"):
        load_sae("gpt2-small-res-jb", "blocks.0.hook_resid_pre")


def test_planted_latent_ranks_first():
    from haltrace.probes.sae_latents import separation_scores, top_latents

    g = torch.Generator().manual_seed(0)
    n, d = 200, 40
    known = torch.arange(n) % 2 == 0
    types = ["player" if i % 4 < 2 else "band" for i in range(n)]
    acts = torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.3)  # noise: 30% firing everywhere
    acts[:, 7] = known.float() * 2.0                       # the planted known latent, both types
    is_player = torch.tensor([t == "player" for t in types])
    acts[:, 13] = (known & is_player).float() * 5.0        # separates players only: min over types kills it
    acts[:, 21] = (~known).float() * (torch.rand(n, generator=g) < 0.9) * 1.5  # unknown latent, 90% firing
    scores = separation_scores(acts, known, types)
    top_k = top_latents(scores, "known", n=3, decoder_norms=torch.full((d,), 0.5))
    assert top_k[0]["latent"] == 7 and top_k[0]["score"] == pytest.approx(1.0)
    assert top_k[0]["scale"] == pytest.approx(1.0)  # mean firing activation 2.0 x decoder norm 0.5
    assert scores["known"][13] <= 0.0
    top_u = top_latents(scores, "unknown", n=1)
    assert top_u[0]["latent"] == 21 and top_u[0]["score"] > 0.75
    assert set(top_u[0]["freq_known"]) == {"band", "player"}
    with pytest.raises(ValueError, match="needs known and unknown"):
        separation_scores(acts[known], known[known], [t for t, k in zip(types, known.tolist(), strict=True) if k])


def test_entity_positions_and_steering(tiny_gpt2, trained, tmp_path):
    from haltrace.probes.sae_latents import (
        entity_positions,
        latent_vector,
        random_directions,
        steered_answers,
    )
    from haltrace.steering.vector import SteeringVector

    prompts = ["what is the capital of france", "the capital of france is"]
    pos = entity_positions(tiny_gpt2.tokenizer, prompts, ["france", "capital"])
    ids = [tiny_gpt2.tokenizer(p)["input_ids"] for p in prompts]
    assert tiny_gpt2.tokenizer.convert_ids_to_tokens(ids[0][pos[0]]) == "france"
    assert tiny_gpt2.tokenizer.convert_ids_to_tokens(ids[1][pos[1]]) == "capital"
    hooks_before = tuple(tiny_gpt2.adapter.layers[1]._forward_hooks)  # transformers may own permanent ones
    plain = steered_answers(tiny_gpt2, prompts, pos, "resid_post.1", None)
    logits = tiny_gpt2.hf(**tiny_gpt2.prepare(prompts)).logits[:, -1].argmax(-1)
    assert plain == [tiny_gpt2.tokenizer.decode([int(t)]).strip() for t in logits]
    d = random_directions(32, 1)[0]
    pushed = steered_answers(tiny_gpt2, prompts, pos, "resid_post.1", d, 1e4)
    assert pushed[0] == pushed[1]  # a huge push decides the answer on its own
    assert tuple(tiny_gpt2.adapter.layers[1]._forward_hooks) == hooks_before  # our hooks removed
    sae, _, _ = trained
    vec = latent_vector(sae, 3, scale=2.5, model=tiny_gpt2)
    back = SteeringVector.load(vec.save(tmp_path / "v"), model=tiny_gpt2)
    assert back.method == "sae" and back.layers == [1] and back.alpha == 2.5
    assert float(back.direction.norm()) == pytest.approx(1.0)
    assert back.provenance["sae_latent"] == 3


def test_cli_train_json_and_errors(store_dir, tmp_path):
    from typer.testing import CliRunner

    from haltrace.probes.sae_cli import app

    runner = CliRunner()
    out = tmp_path / "cli-sae"
    result = runner.invoke(app, ["train", "--store", str(store_dir), "--hook", "resid_post.0", "--d-sae", "32",
                                 "--arch", "topk", "--k", "4", "--steps", "40", "--batch-size", "32",
                                 "--threads", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert report["arch"] == "topk" and report["l0"] == pytest.approx(4.0)
    assert (out / "cfg.json").is_file()
    bad = runner.invoke(app, ["train", "--store", str(store_dir), "--hook", "mlp_out.0", "--d-sae", "8",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "resid_post.1" in bad.output
    missing = runner.invoke(app, ["latents", "--sae", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "cfg.json is missing" in missing.output


# ------------------------------------------------------------------ SAELens' trainer.fit(), entity-latent fidelity
def test_training_runs_sae_lens_fit_not_a_copy_of_its_loop(store_dir, monkeypatch):
    from sae_lens.training.sae_trainer import SAETrainer

    from haltrace.probes.sae import train_sae

    calls = {"fit": 0, "step": 0}
    real_fit, real_step = SAETrainer.fit, SAETrainer.step

    def fit(self):
        calls["fit"] += 1
        calls["cfg"] = self.cfg
        return real_fit(self)

    def step(self, batch):
        calls["step"] += 1
        return real_step(self, batch)

    monkeypatch.setattr(SAETrainer, "fit", fit)
    monkeypatch.setattr(SAETrainer, "step", step)
    sae, report = train_sae(store_dir, "resid_post.0", d_sae=16, arch="topk", k=2, steps=20, batch_size=32,
                            progress=False, num_threads=1)
    assert calls["fit"] == 1 and calls["step"] == 20 == report.steps  # fit() ran the whole loop
    assert calls["cfg"].n_batches_for_norm_estimate == 20  # min(50, steps) batches for the norm estimate
    assert sae.cfg.normalize_activations == "none"  # fit() folded the norm scaling factor into the weights


def _planted_sae(d_in=4, d_sae=4):
    """A StandardSAE whose latent j is relu(x_j): firing rates are easy to count by hand."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_in, d_sae))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(d_sae, d_in))
    return sae


def test_generic_filter_drops_latents_firing_on_two_percent_of_generic_tokens():
    from haltrace.probes.sae_latents import firing_frequency, generic_filter, separation_scores, top_latents

    sae = _planted_sae()
    generic = torch.zeros(1000, 4)
    generic[:, 0] = 1.0  # latent 0 fires on every generic token (dense)
    generic[:20, 1] = 1.0  # latent 1 on exactly 2 %: dropped (the paper keeps < 0.02)
    generic[:19, 2] = 1.0  # latent 2 on 1.9 %: kept
    chunks = [generic[:300], generic[300:]]  # an iterable of chunks counts like one tensor
    freq, n = firing_frequency(sae, iter(chunks))
    assert n == 1000 and freq.tolist() == pytest.approx([1.0, 0.02, 0.019, 0.0])
    keep = generic_filter(freq)
    assert keep.tolist() == [False, False, True, True]
    assert generic_filter(freq, None).all()
    # the dense latent separates best, so without the filter it would rank first
    known = torch.tensor([True] * 10 + [False] * 10)
    acts = torch.zeros(20, 4)
    acts[:10, 0] = 1.0
    acts[:8, 2] = 1.0
    acts[:6, 3] = 1.0
    scores = separation_scores(acts, known, ["band"] * 20)
    assert top_latents(scores, "known", n=1)[0]["latent"] == 0
    kept = top_latents(scores, "known", n=5, keep=keep, generic_freq=freq)
    assert [r["latent"] for r in kept] == [2, 3] and kept[0]["generic_freq"] == pytest.approx(0.019)
    from haltrace.errors import InputError

    with pytest.raises(InputError, match="max_generic_freq=0"):
        generic_filter(freq, 0.0)
    with pytest.raises(InputError, match="generic_stores"):
        firing_frequency(sae, torch.zeros(0, 4))


def test_entity_split_is_by_entity_stratified_and_seeded():
    from haltrace.errors import InputError
    from haltrace.probes.sae_latents import split_entities

    rows = [{"name": f"{kind}{etype}{i}", "known": kind == "k", "etype": etype}
            for kind in ("k", "u") for etype in ("band", "player") for i in range(6) for _ in range(2)]  # 2 questions
    held = split_entities(rows, 0.5, seed=0)
    assert held == split_entities(rows, 0.5, seed=0) and held != split_entities(rows, 0.5, seed=1)
    by_name = {}
    for r, h in zip(rows, held, strict=True):
        by_name.setdefault(r["name"], set()).add(h)
    assert all(len(v) == 1 for v in by_name.values())  # both questions of an entity on one side
    for kind in ("k", "u"):
        for etype in ("band", "player"):
            names = {r["name"] for r, h in zip(rows, held, strict=True) if h and r["name"].startswith(kind + etype)}
            assert len(names) == 3  # half of the 6 entities of every class and type
    assert not any(split_entities(rows, 0.0))
    with pytest.raises(InputError, match="at least 2 per class, type and group"):
        split_entities(rows[:2] + rows[-2:], 0.5)
    with pytest.raises(InputError, match="heldout_fraction=1"):
        split_entities(rows, 1.0)


def test_random_latents_have_zero_score_and_exclude_the_tested_latent():
    from haltrace.probes.sae_latents import random_latents

    scores = {"unknown": torch.tensor([0.9, 0.0, 0.3, 0.0, 0.0, -0.2, 0.0])}
    picked, max_abs = random_latents(scores, "unknown", 3, exclude=[3], seed=0)
    assert len(picked) == 3 and set(picked) <= {1, 4, 6} and max_abs == 0.0
    assert random_latents(scores, "unknown", 3, exclude=[3], seed=0)[0] == picked  # seeded
    few, max_abs = random_latents(scores, "unknown", 5, exclude=[0], seed=0)  # only 4 exact zeros: closest used
    assert sorted(few) == [1, 3, 4, 5, 6] and max_abs == pytest.approx(0.2)


def test_entity_scores_on_held_out_entities_and_random_latent_baseline(tiny_gpt2, trained, tmp_path):
    from haltrace.errors import InputError
    from haltrace.probes.sae_latents import entity_refusal_experiment, score_entity_latents

    sae, _, _ = trained
    names = {("band", True): ["red", "green", "blue", "black"], ("band", False): ["circle", "square", "star", "left"],
             ("player", True): ["right", "top", "what", "bold"], ("player", False): ["is", "a", "of", "capital"]}
    rows = [{"prompt": f"where does the {etype} {name} live", "name": name, "etype": etype, "known": known,
             "group": "known" if known else "unknown_train"}
            for (etype, known), group in names.items() for name in group]
    result = score_entity_latents(sae, tiny_gpt2, rows, store=tmp_path / "entity", top=3, seed=0,
                                  max_generic_freq=0.5)
    split = result["split"]
    assert split["selection"]["entities"] == split["heldout"]["entities"] == 8  # half of each class and type
    selected = {r["name"] for r, s in zip(rows, result["_selection"], strict=True) if s}
    held = {r["name"] for r, h in zip(rows, result["_heldout"], strict=True) if h}
    assert not selected & held and selected | held == {r["name"] for r in rows}
    top = result["unknown"][0]
    assert "score_heldout" in top and "in-sample" in result["scores"]["score"]
    filt = result["generic_filter"]
    # no generic store given: the tokens before each entity ("where does the <type>") are the generic set
    assert filt["n_tokens"] == 4 * len(rows) and "before each entity" in filt["source"]
    assert all(r["generic_freq"] < 0.5 for w in ("known", "unknown") for r in result[w])
    exp = entity_refusal_experiment(sae, tiny_gpt2, result, multiples=(0, 1), n_random=2, n_random_latents=3,
                                    refusal_word="the", known_latent_target=None)
    unk = exp["unknown_latent_on_known"]
    assert unk["n"] == 4 and unk["n_in_sample"] == 4  # held-out known questions; the selection ones apart
    assert "held-out known" in unk["target"]
    assert len(unk["random_latents"]) == 3 and top["latent"] not in unk["random_latents"]
    assert len(unk["random_latents_mean"]) == len(unk["random_latents_std"]) == 2
    assert unk["random_latents_max_abs_score"] <= 0.25  # zero-score latents, or the closest (8 rows)
    with pytest.raises(InputError, match="keys prompt, name, etype, known, group"):
        score_entity_latents(sae, tiny_gpt2, [{"prompt": "x"}], store=tmp_path / "bad")
