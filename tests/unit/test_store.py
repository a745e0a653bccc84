"""Unit tests for the on-disk activation store and harvest (tiny random GPT-2, CPU, a few seconds)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

from haltrace.trace.harvest import dataset_fingerprint, harvest
from haltrace.trace.store import ActivationStore, StoreError


class FakeModel:
    """Duck-typed stand-in for haltrace.models.Model around a tiny random GPT-2, with real forward hooks.

    Char-level tokenizer, left padding, position ids from the attention mask (so padding never changes a
    row's activations). Hooks: resid_pre.i, resid_post.i, attn_out.i, mlp_out.i.
    """

    def __init__(self, seed: int = 0, name: str = "fake/tiny-gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128,
                         bos_token_id=0, eos_token_id=0)
        self.hf = GPT2LMHeadModel(cfg).eval()
        self.name_or_path, self.revision = name, None
        self.n_layers, self.hidden_size = 2, 32
        self.device, self.dtype, self.is_vlm = torch.device("cpu"), torch.float32, False

    def valid_hooks(self) -> list[str]:
        names = [f"{k}.{i}" for k in ("resid_pre", "resid_post", "attn_out", "mlp_out") for i in range(self.n_layers)]
        return names + ["projector_out"]

    def prepare(self, prompts: list[str], images: list | None = None) -> dict[str, torch.Tensor]:
        from transformers import BatchEncoding

        ids = [[1 + ord(c) % 63 for c in p] or [1] for p in prompts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        enc = {"input_ids": input_ids, "attention_mask": mask}
        if images is not None:  # stand-in "vision tower": 3 image tokens per example from the pixels
            enc["pixel_values"] = torch.stack([torch.tensor(list(im.resize((3, 1)).convert("L").tobytes())) % 64
                                               for im in images]).long()
        return BatchEncoding(enc)

    def capture(self, inputs: Mapping, hooks: Sequence[str], positions=None) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        handles = []
        for name in hooks:
            if name == "projector_out":
                got[name] = self.hf.transformer.wte(inputs["pixel_values"]).detach()  # [B, 3, d]
                continue
            kind, layer = name.split(".")
            block = self.hf.transformer.h[int(layer)]

            def save(_m, _a, out, name=name):
                got[name] = (out[0] if isinstance(out, tuple) else out).detach()

            if kind == "resid_pre":
                handles.append(block.register_forward_pre_hook(
                    lambda _m, args, name=name: got.__setitem__(name, args[0].detach())))
            else:
                mod = {"resid_post": block, "attn_out": block.attn, "mlp_out": block.mlp}[kind]
                handles.append(mod.register_forward_hook(save))
        try:
            mask = inputs["attention_mask"]
            with torch.no_grad():
                self.hf(input_ids=inputs["input_ids"], attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        finally:
            for h in handles:
                h.remove()
        if positions in (None, "all"):
            return got
        idx = [-1] if positions == "last" else [positions] if isinstance(positions, int) else list(positions)
        return {k: v if k == "projector_out" else v[:, idx] for k, v in got.items()}


PROMPTS = ["the cat", "a dog runs far", "x", "hello world!", "ab", "zebra crossing at night",
           "q", "mm mm", "twelve chars", "one more"]
DATA = [{"prompt": p, "label": i % 2, "meta": {"id": f"r{i}"}} for i, p in enumerate(PROMPTS)]
HOOKS = ["resid_post.0", "mlp_out.1"]


@pytest.fixture(scope="module")
def model() -> FakeModel:
    return FakeModel()


def direct(model: FakeModel, hooks, positions) -> dict[str, torch.Tensor]:
    return model.capture(model.prepare([d["prompt"] for d in DATA]), hooks, positions)


def run(model, out, **kw) -> ActivationStore:
    kw = {"hooks": HOOKS, "positions": "last", "batch_size": 3, "shard_size": 4, "progress": False, **kw}
    return harvest(model, kw.pop("dataset", DATA), out=out, **kw)


def test_round_trip_last(model, tmp_path):
    store = run(model, tmp_path / "s")
    ref = direct(model, HOOKS, "last")
    assert len(store) == 10 and store.hooks == HOOKS and len(store.shard_paths) == 3
    assert [p.name for p in store.shard_paths] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert store.metadata == DATA
    for hook in HOOKS:
        full = store.load(hook)
        assert full.shape == (10, 1, 32) and store.shape(hook) == (1, 32)
        torch.testing.assert_close(full, ref[hook], rtol=0, atol=1e-5)
        assert torch.equal(torch.cat(list(store.iter_batches(hook, 3))), full)
        assert [b.shape[0] for b in store.iter_batches(hook, 3)] == [3, 3, 3, 1]
        assert torch.equal(store.load(hook, rows=[7, 0, 3, -1]), full[[7, 0, 3, 9]])
        assert torch.equal(store.load(hook, rows=slice(2, 6)), full[2:6])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["positions"] == "last" and m["dtype"] == "float32"
    assert m["model"]["name_or_path"] == "fake/tiny-gpt2" and m["shapes"]["resid_post.0"] == [1, 32]
    assert m["dataset_fingerprint"] == dataset_fingerprint(DATA) and "resid_post" in m["layer_convention"]
    assert m["complete"] and [s["index"] for s in m["shards"]] == [0, 1, 2]
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")]  # atomic writes leave no temp files
    with pytest.raises(KeyError, match="not in this store"):
        store.load("resid_post.1")
    with pytest.raises(IndexError):
        store.load(HOOKS[0], rows=[10])


def test_round_trip_all_positions_ragged(model, tmp_path):
    store = run(model, tmp_path / "s", positions=None, hooks=["resid_pre.1"], dtype=torch.bfloat16)
    inputs = model.prepare(PROMPTS)
    ref = model.capture(inputs, ["resid_pre.1"])["resid_pre.1"]
    mask = inputs["attention_mask"].bool()
    assert store.ragged and store.positions == "all" and store.dtype == torch.bfloat16
    assert store.lengths().tolist() == [len(p) for p in PROMPTS]
    flat = store.load("resid_pre.1")
    assert flat.shape == (sum(map(len, PROMPTS)), 32) and flat.dtype == torch.bfloat16
    torch.testing.assert_close(flat, ref[mask].to(torch.bfloat16), rtol=0, atol=1e-2)
    rows = store.load("resid_pre.1", rows=[5, 1]).split(store.lengths([5, 1]).tolist())
    assert torch.equal(rows[0], flat.split(store.lengths().tolist())[5])
    assert torch.equal(torch.cat(list(store.iter_batches("resid_pre.1", 4))), flat)


def test_images_with_all_positions_mix_ragged_and_fixed_hooks(model, tmp_path):
    from PIL import Image

    data = [{"prompt": p, "image": Image.new("RGB", (6, 6), (20 * i, 5 * i, 0))} for i, p in enumerate(PROMPTS)]
    store = run(model, tmp_path / "s", dataset=data, positions="all", hooks=["resid_post.1", "projector_out"])
    assert store.manifest["layouts"] == {"resid_post.1": "ragged", "projector_out": "fixed"}
    assert store.is_ragged("resid_post.1") and not store.is_ragged("projector_out")
    ref = model.capture(model.prepare(PROMPTS, images=[d["image"] for d in data]), ["projector_out"])
    assert store.load("projector_out").shape == (10, 3, 32)
    torch.testing.assert_close(store.load("projector_out"), ref["projector_out"], rtol=0, atol=0)
    assert store.load("resid_post.1").shape == (sum(map(len, PROMPTS)), 32)
    assert store.metadata == [{"prompt": p} for p in PROMPTS]  # images are not metadata
    with pytest.raises(ValueError, match="some examples in a batch have an 'image'"):
        run(model, tmp_path / "t", dataset=[data[0], {"prompt": "no image"}])


def test_int_list_positions_and_default_shard_size(model, tmp_path):
    store = run(model, tmp_path / "s", positions=[-2, -1], shard_size=None)
    assert store.load("mlp_out.1").shape == (10, 2, 32) and len(store.shard_paths) == 1
    assert store.manifest["shard_size"] == 10
    with pytest.raises(ValueError, match="positions must be"):
        run(model, tmp_path / "t", positions="middle")


def test_resume_after_lost_shard_redoes_only_that_shard(model, tmp_path):
    out = tmp_path / "s"
    full = {h: run(model, out).load(h) for h in HOOKS}
    # simulate a crash after shard 0 and 2: shard 1 and its manifest entry are gone
    (out / "shards" / "shard-00001.safetensors").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["index"] != 1]
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(out)
    redone: list[int] = []
    store = run(model, out, _after_shard=redone.append)
    assert redone == [1] and len(store.shard_paths) == 3
    for h in HOOKS:
        assert torch.equal(store.load(h), full[h])
    assert store.metadata == DATA
    # a finished store is returned as is, no model work
    assert run(model, out, _after_shard=redone.append).hooks == HOOKS and redone == [1]


def test_truncated_shard_is_an_error_on_open_and_redone_by_harvest(model, tmp_path):
    out = tmp_path / "s"
    ref = run(model, out).load(HOOKS[1])
    shard = out / "shards" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(StoreError, match="truncated"):
        ActivationStore.open(out)
    redone: list[int] = []
    with pytest.warns(UserWarning, match="redoing shard 2"):
        store = run(model, out, _after_shard=redone.append)
    assert redone == [2] and torch.equal(store.load(HOOKS[1]), ref)


def test_sequential_dataset_resume(model, tmp_path):
    class OnlyIterable:  # re-iterable, no __getitem__: harvest must skip finished rows by iterating
        def __iter__(self):
            return iter(DATA)

    out = tmp_path / "s"
    ref = run(model, out, dataset=OnlyIterable()).load(HOOKS[0])
    (out / "shards" / "shard-00000.safetensors").unlink()
    (out / "shards" / "shard-00002.safetensors").unlink()
    with pytest.warns(UserWarning, match="redoing shard"):
        store = run(model, out, dataset=OnlyIterable())
    assert torch.equal(store.load(HOOKS[0]), ref)
    with pytest.raises(TypeError, match="one-shot iterator"):
        run(model, tmp_path / "t", dataset=iter(DATA))


@pytest.mark.parametrize("change, what", [
    ({"hooks": ["resid_post.1"]}, "hooks"),
    ({"positions": [0]}, "positions"),
    ({"dtype": torch.float16}, "dtype"),
    ({"dataset": DATA[:-1]}, "data set"),
    ({"dataset": [dict(d, label=7) for d in DATA]}, "data set"),
    ({"shard_size": 5}, "shard_size"),
])
def test_mismatch_is_a_clear_error(model, tmp_path, change, what):
    out = tmp_path / "s"
    run(model, out)
    before = (out / "metadata.jsonl").read_text()
    with pytest.raises(ValueError, match=rf"(?s){what}: store has.*new out directory.*overwrite=True"):
        run(model, out, **change)
    assert (out / "metadata.jsonl").read_text() == before  # the old store is untouched
    store = run(model, out, overwrite=True, **change)
    assert store.manifest["complete"]


def test_other_model_is_a_clear_error(model, tmp_path):
    run(model, tmp_path / "s")
    other = FakeModel(seed=1, name="fake/other")
    with pytest.raises(ValueError, match="model: store has 'fake/tiny-gpt2', now 'fake/other'"):
        run(other, tmp_path / "s")


def test_open_errors(model, tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "haltrace.activation_store", "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        ActivationStore.open(tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        run(model, junk)
    run(model, junk, overwrite=True)
    assert (junk / "notes.txt").read_text() == "mine"  # overwrite removes only store files


def test_bad_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="not offered by this model"):
        run(model, tmp_path / "a", hooks=["resid_post.9"])
    with pytest.raises(ValueError, match="'prompt' string"):
        run(model, tmp_path / "b", dataset=[{"text": "no prompt"}])
    with pytest.raises(ValueError, match="empty"):
        run(model, tmp_path / "c", dataset=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = run(model, tmp_path / "d", dataset=[{"prompt": "hi", "obj": object(), "ok": 1}])
    assert store.metadata == [{"prompt": "hi", "ok": 1}] and "not JSON-serialisable" in str(caught[0].message)


def test_fingerprint_covers_image_pixels():
    from PIL import Image

    a = [{"prompt": "p", "image": Image.new("RGB", (4, 4), (0, 0, 0))}]
    b = [{"prompt": "p", "image": Image.new("RGB", (4, 4), (0, 0, 1))}]
    assert dataset_fingerprint(a) != dataset_fingerprint(b)
    assert dataset_fingerprint(a) == dataset_fingerprint([dict(a[0])])
    assert dataset_fingerprint([{"prompt": "p", "x": 1, "y": 2}]) == dataset_fingerprint([{"y": 2, "x": 1, "prompt": "p"}])


@pytest.mark.parametrize("positions", ["last", "all"])
def test_round_trip_with_real_model_equals_direct_capture(tmp_path, positions):
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny

    real = Model.from_hf(*build_tiny("gpt2"))
    store = run(real, tmp_path / "s", positions=positions, batch_size=5, shard_size=5)
    for lo in (0, 5):  # same batches as harvest used -> identical numbers
        inputs = real.prepare(PROMPTS[lo:lo + 5])
        ref = real.capture(inputs, HOOKS, positions=None if positions == "all" else positions)
        for hook in HOOKS:
            got = store.load(hook, rows=range(lo, lo + 5))
            want = ref[hook][inputs["attention_mask"].bool()] if positions == "all" else ref[hook]
            assert torch.equal(got, want)


def test_lazy_export_from_package():
    import haltrace

    assert haltrace.harvest is harvest and haltrace.ActivationStore is ActivationStore
    assert Path(ActivationStore.__module__.replace(".", "/")).name == "store"
