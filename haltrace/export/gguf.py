"""llama.cpp control vectors (GGUF): export a plain additive steering vector, and read one back.

File layout (the writer convention of repeng, EasySteer and llama.cpp's ``cvector-generator``):

- ``general.architecture = "controlvector"`` (``gguf.GGUFWriter(path, "controlvector")`` writes it);
- ``controlvector.model_hint`` (string) and ``controlvector.layer_count`` (uint32, the model's number of
  decoder blocks);
- one float32 1-D tensor ``direction.N`` of size ``hidden_size`` per steered layer;
- ``haltrace.manifest`` (string): the vector's haltrace manifest, so the file says where it came from.
  llama.cpp reads only the tensors, so extra keys are harmless.

Layer mapping, only through :func:`haltrace.conventions.llama_cpp_direction_index`: llama.cpp adds
``direction.N`` to the output of block ``N`` (``build_cvec(cur, il)`` after the FFN residual add), so
``resid_post.L`` -> ``direction.L``. It rejects ``direction.0``, so ``resid_post.0`` cannot be exported.
``resid_pre.i`` is the same tensor as ``resid_post.{i-1}`` and is converted through haltrace.conventions
(``resid_pre.0``, the embeddings, and ``resid_pre.1`` = ``resid_post.0`` have no slot).

``alpha`` is baked in: the tensors hold ``direction * alpha``. llama.cpp's ``--control-vector FILE`` adds them
as they are; ``--control-vector-scaled FILE S`` multiplies them by ``S`` again at run time.

Only a plain residual add at every position in both phases is expressible: llama.cpp has no position masks,
no phase switch, no projection, no norm rescaling, no per-head or attention/MLP hooks and runs no custom code.

Example
-------
>>> import torch
>>> from haltrace.export.gguf import export_gguf, read_gguf
>>> from haltrace.steering.vector import SteeringVector
>>> vec = SteeringVector.from_mass_mean(torch.ones(4, 16), torch.zeros(4, 16), layers=[2], hidden_size=16)
>>> _ = export_gguf(vec, "entity.gguf", model_hint="llama")
>>> read_gguf("entity.gguf").directions.keys()
dict_keys([2])

Then: ``llama-cli -m model.gguf --control-vector entity.gguf``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haltrace.conventions import (
    HookPoint,
    hidden_states_index,
    hook_from_hidden_states_index,
    llama_cpp_direction_index,
    llama_cpp_tensor_name,
)
from haltrace.export.base import ExportError, ExportResult
from haltrace.export.convert import as_vector, placement_refusals

# the reading half (re-exported: haltrace.export.gguf.read_gguf is public)
from haltrace.export.gguf_read import ARCH, MANIFEST_KEY, ControlVector, _import_gguf, read_gguf  # noqa: F401
from haltrace.steering.vector import SteeringVector


# ---------------------------------------------------------------------------------------------- mapping
def gguf_refusals(vector: SteeringVector) -> list[str]:
    """Why ``vector`` cannot be a llama.cpp control vector (empty list when it can).

    >>> import torch
    >>> gguf_refusals(SteeringVector(torch.ones(4), layers=[2], hidden_size=4, phase="prompt"))
    ['the vector applies only in the prompt phase; llama.cpp adds a control vector while reading the prompt and while generating alike']
    """
    reasons = []
    if vector.hook not in ("resid_post", "resid_pre"):
        reasons.append(f"hook is {vector.hook}, inside a block; llama.cpp adds control vectors only to the residual "
                       "stream at the end of a block (use resid_post)")
    return reasons + placement_refusals("the vector", vector.positions, vector.phase)


def _resid_post(hook: str, layer: int) -> tuple[int, str]:
    """(resid_post layer, label) for a residual hook; resid_pre.i -> resid_post.{i-1} via haltrace.conventions."""
    if hook == "resid_post":
        return layer, f"resid_post.{layer}"
    point = hook_from_hidden_states_index(hidden_states_index(HookPoint("resid_pre", layer)))
    if point.kind == "resid_pre":
        raise ExportError("resid_pre.0 is the embedding output (input of block 0); llama.cpp adds control vectors "
                          "only after a block, so it has no slot for it")
    return point.layer, f"resid_pre.{layer} (= resid_post.{point.layer})"


def gguf_layer_map(vector: SteeringVector) -> dict[int, int]:
    """``{vector layer: llama.cpp direction index}``, or :class:`ExportError` saying why it is not expressible.

    >>> import torch
    >>> gguf_layer_map(SteeringVector(torch.ones(4), layers=[1, 3], hidden_size=4))
    {1: 1, 3: 3}
    """
    reasons = gguf_refusals(vector)
    if reasons:
        raise ExportError(f"cannot export {vector.method} ({vector.hook} layers {vector.layers}) as a llama.cpp "
                          "control vector: " + "; ".join(reasons))
    mapping = {}
    for layer in vector.layers:
        post, label = _resid_post(vector.hook, layer)
        try:
            mapping[layer] = llama_cpp_direction_index(post)
        except ValueError as err:  # resid_post.0; conventions words it, resid_pre.1 adds its alias
            raise ExportError(str(err) if label.startswith("resid_post") else f"{label}: {err}") from None
    return mapping


# ----------------------------------------------------------------------------------------------- export
def export_gguf(vector: Any, path: str | Path, *, model_hint: str | None = None,
                n_layers: int | None = None) -> ExportResult:
    """Write ``vector`` (a SteeringVector, a FittedIntervention or a path to either) as a llama.cpp control vector.

    Tensors hold ``direction * alpha``. ``controlvector.layer_count`` is the model's layer count (``n_layers``,
    else the vector's); when neither is known it is the highest direction index + 1, and a note says so.
    The file is written atomically (temp file + rename) with mode 0644.

    >>> vec = SteeringVector.from_mass_mean(torch.ones(4, 16), torch.zeros(4, 16), layers=[1, 3], hidden_size=16)
    >>> export_gguf(vec, "entity.gguf", model_hint="llava-1.5-7b").layers
    {'resid_post.1': 'direction.1', 'resid_post.3': 'direction.3'}
    """
    from haltrace.trace.store import atomic_write

    gguf = _import_gguf()
    vec = as_vector(vector, n_layers=n_layers)
    mapping = gguf_layer_map(vec)
    notes = []
    layer_count = n_layers or vec.n_layers
    if layer_count is None:
        layer_count = max(mapping.values()) + 1
        notes.append(f"the model's layer count is unknown; controlvector.layer_count = {layer_count} (highest "
                     "direction index + 1). llama.cpp ignores this key; pass n_layers to record the real count")
    arrays = {}
    for layer, index in mapping.items():
        values = (vec.for_layer(layer).double() * float(vec.alpha)).float()
        if not bool(torch.isfinite(values).all()):
            raise ExportError(f"direction * alpha ({vec.alpha}) overflows float32 at layer {layer}")
        arrays[index] = values.numpy().astype(np.float32)
    hint = model_hint if model_hint is not None else (vec.model or "unknown")
    manifest = json.dumps(vec.manifest(), sort_keys=True, allow_nan=False, default=str)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", hint)
            writer.add_uint32(f"{ARCH}.layer_count", int(layer_count))
            writer.add_string(MANIFEST_KEY, manifest)
            for index in sorted(arrays):
                writer.add_tensor(llama_cpp_tensor_name(index), arrays[index])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    path = Path(path)
    atomic_write(path, write)
    path.chmod(0o644)  # mkstemp makes 0600; the file is meant to be shared and served
    if float(vec.alpha) != 1.0:
        notes.append(f"alpha {vec.alpha} is baked into the tensors; llama.cpp's --control-vector-scaled multiplies "
                     "again at run time")
    labels = {layer: _resid_post(vec.hook, layer)[1].split(" ")[0] for layer in mapping}
    return ExportResult("gguf", path, [path], {labels[k]: llama_cpp_tensor_name(v) for k, v in mapping.items()},
                        vec.hidden_size, int(layer_count), float(vec.alpha), vec.method, vec.model, hint, notes)
