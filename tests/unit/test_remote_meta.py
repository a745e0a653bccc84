"""``load(..., remote=True)`` builds the model on the meta device (no weight file read) and runs capture and
harvest through nnsight's remote path; steering and fits refuse it.

NDIF is simulated in-process: the client's trace is serialized exactly as nnsight's ``RemoteBackend`` would
send it (``RequestModel.serialize``, then deserialized with local modules hidden, as nnsight's own
``remote="local"`` backend does), but it runs on a separate *server* model that loaded the weights, and only
the saved values come back (through ``torch.save``/``torch.load``, as a server's reply does). The client
model must keep every parameter on ``meta`` throughout.
"""

from __future__ import annotations

import io

import pytest
import torch

from haltrace.models import Model
from haltrace.models.loading import load
from haltrace.models.tiny import build_tiny, build_tiny_inputs

pytest.importorskip("nnsight")


class _SimulatedNDIF:
    """A stand-in for NDIF's worker: deserialize the request against the server's model and run it there."""

    def __init__(self, server: object, requests: list[int]):
        self.server, self.requests = server, requests

    def __call__(self, tracer: object) -> dict:
        from nnsight.intervention.backends.local import LocalSimulationBackend
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, mark
        from nnsight.tracing.util import push

        pull_env()
        blob = RequestModel.serialize(tracer)
        self.requests.append(len(blob))
        hider = LocalSimulationBackend(self.server)
        hidden = hider._hide_local_modules()  # the server has no haltrace: the block must not need it
        try:
            restored = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects())
        finally:
            hider._restore(hidden)
        restored.execute(restored.info.code)
        saved = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
        buf = io.BytesIO()
        torch.save(saved, buf)  # the reply travels as bytes
        buf.seek(0)
        result = torch.load(buf, weights_only=False)
        for value in result.values():
            mark(value)
        push(tracer.info.frame, result)
        return result


@pytest.fixture()
def remote_pair(tmp_path, monkeypatch):
    """(client Model loaded with remote=True, reference Model with weights, inputs, request sizes)."""
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.modeling.transformers import TransformersModel

    hf, tok = build_tiny("llama")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reference = Model.from_hf(hf, tok, name="tiny-llama")
    server = TransformersModel(str(tmp_path), tokenizer=tok, task="text-generation", dispatch=True)
    requests: list[int] = []
    monkeypatch.setattr(Remotable, "_remote_backend",
                        lambda self, remote, blocking, job_id, verbose: _SimulatedNDIF(server, requests))
    import transformers

    def no_weights(*_a, **_k):
        raise AssertionError("remote=True must not read the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    client = load(str(tmp_path), remote=True, device="cpu")
    return client, reference, build_tiny_inputs("llama", tok), requests


def _all_meta(model: Model) -> None:
    params = list(model.hf.parameters())
    assert params and all(p.device.type == "meta" for p in params), "a client parameter left the meta device"


def test_remote_capture_and_harvest_without_local_weights(remote_pair, tmp_path) -> None:
    from haltrace.trace.harvest import harvest

    client, reference, inputs, requests = remote_pair
    _all_meta(client)
    assert client.device == torch.device("cpu")
    hooks = ["resid_post.0", "resid_post.1", "mlp_out.1"]
    with pytest.warns(UserWarning, match="unpickled"):
        got = client.capture(inputs, hooks, positions="last")
    ref = reference.capture(inputs, hooks, positions="last")
    assert requests, "the trace did not go through the remote path"
    for h in hooks:
        assert got[h].shape == ref[h].shape
        assert torch.allclose(got[h], ref[h], atol=1e-5), h
    _all_meta(client)
    # harvest: the store from the remote model equals the one from local weights
    data = [{"prompt": p} for p in ("a red circle", "the blue square is", "one", "two green dots")]
    with pytest.warns(UserWarning):
        remote_store = harvest(client, data, ["resid_post.1"], positions="last", out=tmp_path / "r",
                               batch_size=2, progress=False)
    local_store = harvest(reference, data, ["resid_post.1"], positions="last", out=tmp_path / "l",
                          batch_size=2, progress=False)
    a, b = remote_store.load("resid_post.1"), local_store.load("resid_post.1")
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5)
    _all_meta(client)


def test_remote_model_refuses_local_work(remote_pair, tmp_path) -> None:
    from haltrace.errors import InputError
    from haltrace.steering.engine import Add, steer
    from haltrace.steering.registry import get_method

    client, _, inputs, _ = remote_pair
    with pytest.raises(InputError, match="remote=True"), steer(client, Add("resid_post.0", torch.ones(32))):
        pass
    with pytest.raises(InputError, match="remote=True"):
        get_method("caa").fit(client)
    with pytest.raises(InputError, match="remote=True"):
        client.hooks(["resid_post.0"])
    from haltrace.evals.runner import Job, run_jobs

    with pytest.raises(InputError, match="remote=True"):
        run_jobs(client, [Job(1, "is there a red circle ?")], tmp_path / "a.jsonl", key_field="question_id",
                 row=lambda job, text: {"question_id": job.key, "text": text})
    _all_meta(client)


def test_remote_logit_lens_matches_local(remote_pair) -> None:
    from haltrace.trace.lens import logit_lens

    client, reference, inputs, requests = remote_pair
    n = len(requests)
    with pytest.warns(UserWarning, match="unpickled"):
        got = logit_lens(client, inputs, ["red"], positions="last", top_k=5)
    ref = logit_lens(reference, inputs, ["red"], positions="last", top_k=5)
    assert len(requests) == n + 1  # one remote request, logits computed on the server
    assert torch.equal(got.top_ids, ref.top_ids)
    assert torch.allclose(got.top_logprobs, ref.top_logprobs, atol=1e-4)
    assert torch.equal(got.target_ranks, ref.target_ranks)
    _all_meta(client)


def test_remote_attention_to_image_matches_local(tmp_path, monkeypatch) -> None:
    """A VLM (tiny LLaVA) loaded with remote=True: attention-to-image through the simulated NDIF."""
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.modeling.transformers import TransformersModel

    from haltrace.trace.attention import attention_to_image

    hf, proc = build_tiny("llava")
    hf.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    reference = Model.from_hf(hf, proc, name="tiny-llava")
    server = TransformersModel(str(tmp_path), processor=proc, task="image-text-to-text", dispatch=True,
                               attn_implementation="eager")
    requests: list[int] = []
    monkeypatch.setattr(Remotable, "_remote_backend",
                        lambda self, remote, blocking, job_id, verbose: _SimulatedNDIF(server, requests))
    client = load(str(tmp_path), remote=True, attn_implementation="eager")
    _all_meta(client)
    inputs = build_tiny_inputs("llava", proc)
    with pytest.warns(UserWarning, match="unpickled"):
        got = attention_to_image(client, inputs, layers=[0, 1])
    ref = attention_to_image(reference, inputs, layers=[0, 1])
    assert requests and got.ratio.shape == ref.ratio.shape
    assert torch.allclose(got.ratio, ref.ratio, atol=1e-5)
    assert torch.equal(got.n_keys, ref.n_keys)
    _all_meta(client)
