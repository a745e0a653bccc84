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
