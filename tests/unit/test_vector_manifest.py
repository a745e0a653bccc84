"""SteeringVector manifest (format 2): every key the issue lists, version-1 files, and clear errors on load for
wrong sizes, truncated files, pickles (never executed), bad manifests and NaNs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from haltrace._version import __version__
from haltrace.steering.vector import (
    FORMAT_VERSION,
    LAYER_CONVENTION,
    SteeringVector,
    VectorError,
    describe_model,
)
from haltrace.trace.harvest import dataset_fingerprint

ROWS = [{"prompt": "a red circle", "label": 1}, {"prompt": "a blue square", "label": 0}]


def _vec(**kw) -> SteeringVector:
    base = dict(direction=torch.arange(1.0, 9.0), layers=[2], hidden_size=8, alpha=1.5, method="mass_mean",
                model="org/model", model_revision="abc123", n_layers=4, data_fingerprint=dataset_fingerprint(ROWS))
    return SteeringVector(**(base | kw))


def _rewrite(path: Path, manifest: dict | str, tensors: dict | None = None) -> None:
    """Write a safetensors file with a hand-made manifest (and no JSON twin)."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors or {"direction": torch.ones(8)}, str(path), metadata={"haltrace": text})


def test_manifest_carries_every_key_and_round_trips(tmp_path):
    vec = _vec()
    vec.save(tmp_path / "v")
    manifest = json.loads((tmp_path / "v.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    expected = {"method": "mass_mean", "model": "org/model", "model_revision": "abc123", "hidden_size": 8,
                "n_layers": 4, "hook": "resid_post", "layer_convention": LAYER_CONVENTION, "layers": [2],
                "alpha": 1.5, "positions": "all", "phase": "both", "haltrace_version": __version__,
                "data_fingerprint": dataset_fingerprint(ROWS)}
    assert {k: manifest[k] for k in expected} == expected
    assert "hidden_states[i+1]" in LAYER_CONVENTION and "haltrace.conventions" in LAYER_CONVENTION
    back = SteeringVector.load(tmp_path / "v")
    assert (back.model_revision, back.data_fingerprint, back.haltrace_version) == (
        "abc123", dataset_fingerprint(ROWS), __version__)
    assert back.manifest() == vec.manifest()


def test_fingerprint_lifted_from_provenance_and_model_described():
    vec = SteeringVector(torch.ones(4), layers=[1], hidden_size=4, provenance={"data_fingerprint": "sha256:x"})
    assert vec.data_fingerprint == "sha256:x"
    model = SimpleNamespace(name_or_path="org/m", revision=None, hidden_size=4, n_layers=3,
                            hf=SimpleNamespace(config=SimpleNamespace(_commit_hash="deadbeef")))
    assert describe_model(model) == {"model": "org/m", "model_revision": "deadbeef", "hidden_size": 4,
                                     "n_layers": 3}
    model.revision = "v1.0"  # the revision asked for at load time wins over the config's hash
    assert describe_model(model)["model_revision"] == "v1.0"


def test_version_1_files_still_load(tmp_path):
    v1 = {"format": "haltrace.steering_vector", "format_version": 1, "per_layer": False, "hook": "resid_post",
          "layers": [1], "alpha": 2.0, "positions": "all", "phase": "both", "method": "probe", "model": "m",
          "hidden_size": 8, "n_layers": 4, "provenance": {"data_fingerprint": "sha256:old"}}
    _rewrite(tmp_path / "old.safetensors", v1)
    vec = SteeringVector.load(tmp_path / "old")
    assert vec.alpha == 2.0 and vec.model_revision is None and vec.haltrace_version is None
    assert vec.data_fingerprint == "sha256:old"  # from provenance


def test_other_hidden_size_or_layer_count_names_both(tmp_path):
    _vec().save(tmp_path / "v")
    other = SimpleNamespace(name_or_path="big-model", hidden_size=16, n_layers=4)
    with pytest.raises(VectorError, match=r"hidden size 8 .*big-model's hidden size 16"):
        SteeringVector.load(tmp_path / "v", model=other)
    deeper = SimpleNamespace(name_or_path="deep-model", hidden_size=8, n_layers=32)
    with pytest.raises(VectorError, match=r"4 layers .*deep-model has 32 layers"):
        SteeringVector.load(tmp_path / "v", model=deeper)
    with pytest.raises(VectorError, match=r"4 layers .*has 6 layers"):
        SteeringVector.load(tmp_path / "v", hidden_size=8, n_layers=6)


def test_truncated_file_is_refused(tmp_path):
    path = _vec().save(tmp_path / "v")
    data = path.read_bytes()
    (tmp_path / "v.json").unlink()
    for cut, words in [(len(data) - 5, "truncated"), (20, "truncated"), (3, "truncated")]:
        path.write_bytes(data[:cut])
        with pytest.raises(VectorError, match=words):
            SteeringVector.load(path)


class _Payload:
    """Unpickling this would create a marker file: proof that loading never runs pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_refused_and_never_executed(tmp_path, protocol):
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    with pytest.raises(VectorError, match="not a safetensors file.*never unpickles"):
        SteeringVector.load(path)
    assert not marker.exists()


def test_torch_save_file_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "vec.safetensors"
    torch.save({"direction": torch.ones(8), "payload": _Payload(marker)}, path)  # saving runs nothing
    with pytest.raises(VectorError, match=r"torch\.save.*never unpickles"):
        SteeringVector.load(path)
    assert not marker.exists()


def test_bad_manifests_are_refused(tmp_path):
    good = _vec().manifest()
    _rewrite(tmp_path / "notjson.safetensors", "{not json")
    with pytest.raises(VectorError, match="not valid JSON"):
        SteeringVector.load(tmp_path / "notjson")
    _rewrite(tmp_path / "lacks.safetensors", {k: v for k, v in good.items() if k not in ("alpha", "layers")})
    with pytest.raises(VectorError, match=r"lacks keys \['layers', 'alpha'\]"):
        SteeringVector.load(tmp_path / "lacks")
    _rewrite(tmp_path / "types.safetensors", good | {"hidden_size": "8"})
    with pytest.raises(VectorError, match="wrong type.*hidden_size"):
        SteeringVector.load(tmp_path / "types")
    _rewrite(tmp_path / "conv.safetensors", good | {"layer_convention": "HF hidden_states index"})
    with pytest.raises(VectorError, match="numbers layers as"):
        SteeringVector.load(tmp_path / "conv")
    _rewrite(tmp_path / "future.safetensors", good | {"format_version": 9})
    with pytest.raises(VectorError, match="upgrade haltrace"):
        SteeringVector.load(tmp_path / "future")
    _rewrite(tmp_path / "extra.safetensors", good, {"direction": torch.ones(8), "sneaky": torch.ones(2)})
    with pytest.raises(VectorError, match="holds tensors"):
        SteeringVector.load(tmp_path / "extra")


def test_nan_values_and_json_twin_disagreement(tmp_path):
    good = _vec().manifest()
    _rewrite(tmp_path / "nan.safetensors", good, {"direction": torch.tensor([1.0, float("nan")] + [0.0] * 6)})
    with pytest.raises(VectorError, match="NaN or inf"):
        SteeringVector.load(tmp_path / "nan")
    _rewrite(tmp_path / "alpha.safetensors", json.dumps(good | {"alpha": float("nan")}))
    with pytest.raises(VectorError, match="alpha is nan"):
        SteeringVector.load(tmp_path / "alpha")
    _vec().save(tmp_path / "twin")
    edited = json.loads((tmp_path / "twin.json").read_text()) | {"alpha": 99.0}
    (tmp_path / "twin.json").write_text(json.dumps(edited))
    with pytest.raises(VectorError, match=r"disagrees .* on \['alpha'\]"):
        SteeringVector.load(tmp_path / "twin")



def test_header_length_that_looks_like_a_pickle_opcode_still_loads(tmp_path):
    """A safetensors header of e.g. 1152 bytes starts with bytes 0x80 0x04, a pickle's PROTO opcode: such a
    genuine vector must load (the pickle check looks only at files not laid out as safetensors)."""
    import struct

    import torch

    from haltrace.steering.vector import SteeringVector

    for pad in range(0, 1400, 1):
        vec = SteeringVector(direction=torch.ones(8), layers=[1], hidden_size=8, provenance={"pad": "x" * pad})
        path = vec.save(tmp_path / "v")
        head = path.read_bytes()[:8]
        if head[0] == 0x80 and 2 <= head[1] <= 5:
            break
    else:
        raise AssertionError("no padding produced a header length starting 0x80 0x02..0x05")
    assert struct.unpack("<Q", head)[0] & 0xFF == 0x80
    assert torch.equal(SteeringVector.load(path).direction, torch.ones(8))
