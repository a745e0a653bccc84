"""Apply an exported haltrace steering vector to a plain Hugging Face model, with forward hooks.

This file imports only torch, safetensors and the standard library (never ``haltrace``), so it can be copied
on its own into a service. It reads the ``NAME.safetensors`` file that ``SteeringVector.save`` writes (tensor
``direction`` for every layer, or ``direction.{L}`` per layer; the JSON manifest sits in the safetensors header
under ``"haltrace"``) and never unpickles anything.

Layer convention (as in haltrace): ``resid_post.L`` is the output of decoder block ``L`` (HF
``hidden_states[L + 1]``), ``resid_pre.L`` its input (``hidden_states[L]``). ``alpha * direction`` is added to
every token, in the prompt and in every generated step. Anything this module cannot reproduce exactly (other
positions or phases, other hooks, a vector for another model) is refused with a ``DeployError``.

Example
-------
>>> from transformers import AutoModelForCausalLM                       # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained("my-model")             # doctest: +SKIP
>>> with steered(model, "vectors/entity.safetensors", alpha=4.0):        # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=16)
>>> handle = apply(model, "vectors/entity")                              # doctest: +SKIP
>>> handle.remove()                                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "haltrace.steering_vector"
FORMAT_VERSIONS = (1, 2)  # version 2 only adds manifest keys; the tensors and the keys read here are the same
HOOKS = ("resid_post", "resid_pre")

#: attribute paths to a model's decoder blocks, tried in order (the first that is a ModuleList wins)
LAYER_PATHS = (
    "model.language_model.layers",  # LLaVA-style VLMs in transformers >= 4.52 / 5
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, ...
    "language_model.model.layers",  # LLaVA-style VLMs in older transformers
    "model.language_model.model.layers",
    "language_model.layers",  # an inner VLM model passed directly
    "model.text_model.layers",
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",
    "transformer.blocks",  # MPT
    "layers",  # a bare decoder (e.g. LlamaModel)
)


class DeployError(ValueError):
    """The vector cannot be applied exactly to this model (wrong file, size, layer, or a rule not supported)."""


@dataclass
class DeployedVector:
    """A loaded additive vector: ``directions[L]`` is the float32 ``[d]`` added (times ``alpha``) at layer ``L``."""

    directions: dict[int, torch.Tensor]
    alpha: float
    hook: str = "resid_post"
    hidden_size: int = 0
    n_layers: int | None = None
    model: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


def _tensor_path(path: str | Path) -> Path:
    # accept NAME, NAME.safetensors or NAME.json, like haltrace itself
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors")


def _check_direction(name: str, t: torch.Tensor, hidden_size: int) -> torch.Tensor:
    if not t.is_floating_point() or t.dim() != 1 or t.shape[0] != hidden_size:
        raise DeployError(f"{name} must be a float [{hidden_size}] tensor (hidden_size), got {t.dtype} "
                          f"{tuple(t.shape)}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise DeployError(f"{name} holds NaN or inf values; the vector is corrupt, export it again")
    return t


def load_vector(path: str | Path) -> DeployedVector:
    """Read a haltrace ``SteeringVector`` file (safetensors only) and check it is one this module can apply.

    >>> from haltrace.steering.vector import SteeringVector   # (haltrace only to write the example file)
    >>> _ = SteeringVector(torch.ones(32), layers=[2], hidden_size=32, alpha=4.0).save("vectors/entity")
    >>> vec = load_vector("vectors/entity.safetensors")
    >>> vec.layers, vec.alpha
    ([2], 4.0)
    """
    from safetensors import SafetensorError, safe_open

    file = _tensor_path(path)
    if not file.is_file():
        raise DeployError(f"steering vector {file} not found")
    try:
        with safe_open(str(file), framework="pt") as fh:
            text = (fh.metadata() or {}).get("haltrace")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise DeployError(f"{file} is not a readable safetensors file ({err})") from None
    try:
        manifest = json.loads(text) if text else None
    except json.JSONDecodeError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DeployError(f"{file} is not a haltrace steering vector (no {FORMAT_NAME} manifest in its header)")
    if manifest.get("format_version") not in FORMAT_VERSIONS:
        raise DeployError(f"{file} has vector format version {manifest.get('format_version')!r}; this deploy "
                          f"module reads versions {FORMAT_VERSIONS}")
    try:
        hook, layers, alpha = manifest["hook"], [int(x) for x in manifest["layers"]], float(manifest["alpha"])
        positions, phase, hidden_size = manifest["positions"], manifest["phase"], int(manifest["hidden_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise DeployError(f"{file}: manifest lacks or mangles {err}") from None
    # refuse what a plain every-token hook would get wrong, rather than steer the wrong tokens silently
    if hook not in HOOKS:
        raise DeployError(f"{file} steers at {hook!r}; haltrace.deploy applies only {HOOKS} additive vectors")
    if positions != "all":
        raise DeployError(f"{file} steers positions {positions!r}; haltrace.deploy adds to every token "
                          "(positions='all') only, use haltrace's engine for position rules")
    if phase != "both":
        raise DeployError(f"{file} steers in phase {phase!r}; haltrace.deploy steers prompt and generation "
                          "alike (phase='both') only, use haltrace's engine for phases")
    if not layers or len(set(layers)) != len(layers):
        raise DeployError(f"{file} lists layers {layers}; it needs at least one, each once")
    if manifest.get("per_layer"):
        found = {k: v for k, v in tensors.items() if k.startswith("direction.")}
        if sorted(found) != sorted(f"direction.{L}" for L in layers):
            raise DeployError(f"{file} holds tensors {sorted(found)} but its manifest lists layers {layers}")
        directions = {L: _check_direction(f"direction.{L}", found[f"direction.{L}"], hidden_size) for L in layers}
    elif "direction" in tensors:
        shared = _check_direction("direction", tensors["direction"], hidden_size)
        directions = dict.fromkeys(layers, shared)
    else:
        raise DeployError(f"{file} holds no 'direction' tensor")
    return DeployedVector(directions, alpha, hook, hidden_size, manifest.get("n_layers"),
                          str(manifest.get("model") or ""), manifest)


def find_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a plain HF model, found by the common attribute paths in :data:`LAYER_PATHS`.

    >>> from haltrace.models.tiny import build_tiny   # a 2-block random Llama
    >>> len(find_layers(build_tiny("llama")[0]))
    2
    """
    for path in LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise DeployError(f"cannot find the decoder layers of {type(model).__name__}; tried "
                      f"{', '.join(LAYER_PATHS)}. Pass them explicitly: apply(model, vec, layers=<the ModuleList "
                      "of decoder blocks>)")


def _hidden_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return None


class DeployHandle:
    """The installed hooks; ``remove()`` takes them all off (idempotent). Also a context manager."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> DeployHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _Delta:
    """``alpha * direction`` on the hidden state's device and dtype, cached per (device, dtype): rebuilding and
    moving it on every decoding step would cost more than the add (and a device sync on GPU)."""

    def __init__(self, direction: torch.Tensor, alpha: float, hidden_size: int, layer: int):
        # multiply in float32, then cast: the same arithmetic as haltrace's engine, so results match exactly
        self.base, self.hidden_size, self.layer = alpha * direction, hidden_size, layer
        self.cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise DeployError(f"layer {self.layer} carries hidden states of size {x.shape[-1]}, the vector has "
                              f"size {self.hidden_size}; were the right layers= passed?")
        key = (x.device, x.dtype)
        delta = self.cache.get(key)
        if delta is None:
            delta = self.cache[key] = self.base.to(device=x.device, dtype=x.dtype)
        return x + delta


def _post_hook(delta: _Delta) -> Any:
    def hook(_module: Any, _args: Any, output: Any) -> Any:
        # decoder blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state
        if isinstance(output, torch.Tensor):
            return delta.add(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (delta.add(output[0]), *output[1:])
        raise DeployError(f"cannot steer a decoder block that returns {type(output).__name__}")
    return hook


def _pre_hook(delta: _Delta) -> Any:
    def hook(_module: Any, args: tuple, kwargs: dict) -> Any:
        if args:
            return (delta.add(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": delta.add(kwargs["hidden_states"])}
        raise DeployError("cannot find the hidden states among the decoder block's inputs")
    return hook


#: ``|alpha * direction|`` above this many times ``sqrt(hidden_size)`` (the norm of a unit-variance residual)
#: is far outside what any implemented method's paper uses; warned about, not refused
NORM_RATIO_WARN = 100.0


def _warn_strength(delta: _Delta, alpha: float) -> None:
    """Warn when the added vector will destroy the output: non-finite, or huge next to the residual stream."""
    size = float(delta.base.float().norm())
    typical = math.sqrt(max(delta.hidden_size, 1))
    if not math.isfinite(size) or not bool(torch.isfinite(delta.base).all()):
        warnings.warn(f"haltrace.deploy: alpha={alpha:g} times direction.{delta.layer} is not finite; every logit "
                      "will be NaN", stacklevel=3)
    elif size / typical > NORM_RATIO_WARN:
        warnings.warn(f"haltrace.deploy: alpha={alpha:g} adds a vector of norm {size:.3g} at layer {delta.layer}, "
                      f"{size / typical:.3g}x a typical residual norm (sqrt(hidden size) = {typical:.3g}); papers "
                      "steer at <= ~10x, so expect NaN logits or noise", stacklevel=3)


def apply(model: torch.nn.Module, vector: DeployedVector | str | Path, *, alpha: float | None = None,
          layers: torch.nn.ModuleList | None = None) -> DeployHandle:
    """Add ``alpha * direction`` at the vector's layers of ``model``; returns a handle to ``remove()`` it.

    ``alpha`` overrides the exported one; ``layers`` is the model's ModuleList of decoder blocks when
    :func:`find_layers` cannot find it. Everything is checked before any hook is installed.

    >>> from haltrace.models.tiny import build_tiny
    >>> from haltrace.steering.vector import SteeringVector
    >>> model, tokenizer = build_tiny("llama")
    >>> _ = SteeringVector(torch.ones(32), layers=[1], hidden_size=32).save("vectors/entity")
    >>> handle = apply(model, "vectors/entity", alpha=2.0)
    >>> handle.remove()
    """
    vec = vector if isinstance(vector, DeployedVector) else load_vector(vector)
    scale = vec.alpha if alpha is None else float(alpha)
    if not math.isfinite(scale):
        raise DeployError(f"alpha is {scale}; steering with it would corrupt every output")
    if vec.hook not in HOOKS:
        raise DeployError(f"hook {vec.hook!r} is not supported; haltrace.deploy applies {HOOKS} only")
    blocks = find_layers(model) if layers is None else layers
    if not isinstance(blocks, torch.nn.ModuleList):
        raise DeployError(f"layers= must be the model's torch.nn.ModuleList of decoder blocks, got "
                          f"{type(blocks).__name__}")
    n = len(blocks)
    size = _hidden_size(model)
    if size is not None and size != vec.hidden_size:
        raise DeployError(f"vector hidden size {vec.hidden_size} (made for {vec.model or 'another model'}) does "
                          f"not match the model's hidden size {size}")
    if vec.n_layers is not None and vec.n_layers != n:
        raise DeployError(f"vector was made for a model with {vec.n_layers} layers ({vec.model or 'unnamed'}); "
                          f"this model has {n}")
    bad = [L for L in vec.layers if not 0 <= L < n]
    if bad:
        raise DeployError(f"vector layers {bad} are out of range: this model has layers 0..{n - 1}")
    handles: list[Any] = []
    try:
        for L in vec.layers:
            delta = _Delta(_check_direction(f"direction.{L}", vec.directions[L], vec.hidden_size), scale,
                           vec.hidden_size, L)
            _warn_strength(delta, scale)
            if vec.hook == "resid_post":
                handles.append(blocks[L].register_forward_hook(_post_hook(delta)))
            else:
                handles.append(blocks[L].register_forward_pre_hook(_pre_hook(delta), with_kwargs=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return DeployHandle(handles)


@contextmanager
def steered(model: torch.nn.Module, vector: DeployedVector | str | Path, *, alpha: float | None = None,
            layers: torch.nn.ModuleList | None = None) -> Iterator[DeployHandle]:
    """Steer ``model`` inside the block; the hooks come off on exit, also when the block raises.

    >>> from haltrace.models.tiny import build_tiny
    >>> from haltrace.steering.vector import SteeringVector
    >>> model, tokenizer = build_tiny("llama")
    >>> _ = SteeringVector(torch.ones(32), layers=[1], hidden_size=32).save("vectors/entity")
    >>> inputs = tokenizer(["what color is the circle"], return_tensors="pt")
    >>> with steered(model, "vectors/entity.safetensors"):
    ...     logits = model(**inputs).logits
    >>> bool((logits != model(**inputs).logits).any())   # the hooks are off again
    True
    """
    handle = apply(model, vector, alpha=alpha, layers=layers)
    try:
        yield handle
    finally:
        handle.remove()
