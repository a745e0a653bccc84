"""The one place where haltrace's layer-index convention and hook vocabulary are written down.

Layer index
-----------
haltrace numbers decoder blocks ``0 .. n_layers-1``, as ``model.layers[i]`` does. A hook name carries the
block index, and every method, store and export converts through the functions in this module, never by hand.

================  ====================================  ==================================
haltrace name     meaning                               Hugging Face equivalent
================  ====================================  ==================================
``resid_pre.i``   input of block ``i``                  ``hidden_states[i]``
``resid_post.i``  output of block ``i``                 ``hidden_states[i + 1]`` (i < n-1)
``attn_out.i``    attention output (after o_proj)       ``layers[i].self_attn`` output
``mlp_out.i``     MLP output                            ``layers[i].mlp`` output
``head_out.i``    per-head attention, input of o_proj   ``[..., n_heads, head_dim]``
``attn_pattern.i``  softmax attention weights           ``attentions[i]`` (eager only)
``vision_out``    vision tower features fed to the projector
``projector_out`` projected image features (the LLM's image-token embeddings)
================  ====================================  ==================================

``hidden_states[0]`` is the embedding output (== ``resid_pre.0``). For Llama-family models HF applies the
final norm to the *last* entry of ``hidden_states``; ``resid_post.{n-1}`` is always the *un-normed* block
output, so it differs from ``hidden_states[-1]`` there. The logit lens applies the final norm itself.

External conventions map to ours as follows (see ``../shared/research/methods-llm-eval.md`` §0):
TransformerLens ``blocks.L.hook_resid_post`` == ``resid_post.L``; repeng / CAA "layer L" == ``resid_post.L``;
llama.cpp control vector ``direction.N`` is added to the output of block ``N`` (``build_cvec(cur, il)`` after
the FFN residual add of block ``il``; ``shared/research/ecosystem.md`` §1c) == ``resid_post.N``. llama.cpp
rejects ``direction.0``, so ``resid_post.0`` has no llama.cpp slot.

Example
-------
>>> parse_hook("resid_post.3")
HookPoint(kind='resid_post', layer=3)
>>> hidden_states_index(parse_hook("resid_post.3"))
4
"""

from __future__ import annotations

from dataclasses import dataclass

#: Hook kinds that take a layer index.
LAYER_HOOKS: tuple[str, ...] = (
    "resid_pre",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head_out",
    "attn_pattern",
)
#: Hook kinds without a layer index (VLMs only).
GLOBAL_HOOKS: tuple[str, ...] = ("vision_out", "projector_out")
HOOK_KINDS: tuple[str, ...] = LAYER_HOOKS + GLOBAL_HOOKS


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name: ``kind`` plus block index (``None`` for global hooks)."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.name


def valid_hook_names(n_layers: int, *, vision: bool = False) -> list[str]:
    """Every hook name a model with ``n_layers`` decoder blocks offers."""
    names = [f"{kind}.{i}" for kind in LAYER_HOOKS for i in range(n_layers)]
    if vision:
        names += list(GLOBAL_HOOKS)
    return names


def _describe_valid(n_layers: int | None, vision: bool) -> str:
    if n_layers is None:
        return f"kinds {', '.join(LAYER_HOOKS)} (with '.<layer>') and {', '.join(GLOBAL_HOOKS)}"
    text = f"{', '.join(k + '.{0..' + str(n_layers - 1) + '}' for k in LAYER_HOOKS)}"
    if vision:
        text += ", " + ", ".join(GLOBAL_HOOKS)
    return text


def parse_hook(name: str, n_layers: int | None = None, *, vision: bool = True) -> HookPoint:
    """Parse and validate a hook name such as ``"resid_post.3"`` or ``"projector_out"``.

    Negative layers count from the end when ``n_layers`` is known (``resid_post.-1`` is the last block).
    Raises ``ValueError`` naming the valid hooks when the name or layer is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"hook name must be a string like 'resid_post.3', got {type(name).__name__}")
    kind, _, index = name.partition(".")
    if kind in GLOBAL_HOOKS and not index:
        if not vision:
            raise ValueError(f"hook {name!r} needs a vision-language model; valid hooks: "
                             f"{_describe_valid(n_layers, vision)}")
        return HookPoint(kind)
    if kind not in LAYER_HOOKS:
        raise ValueError(f"unknown hook {name!r}; valid hooks: {_describe_valid(n_layers, vision)}")
    if not index:
        raise ValueError(f"hook {name!r} needs a layer index, e.g. '{kind}.0'; valid hooks: "
                         f"{_describe_valid(n_layers, vision)}")
    try:
        layer = int(index)
    except ValueError:
        raise ValueError(f"hook {name!r}: layer {index!r} is not an integer; valid hooks: "
                         f"{_describe_valid(n_layers, vision)}") from None
    if n_layers is not None:
        if layer < 0:
            layer += n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"hook {name!r}: layer out of range; this model has layers 0..{n_layers - 1} "
                             f"(valid hooks: {_describe_valid(n_layers, vision)})")
    return HookPoint(kind, layer)


def hidden_states_index(hook: HookPoint | str) -> int:
    """Index into HF ``output_hidden_states`` for a residual hook: resid_pre.i -> i, resid_post.i -> i+1."""
    point = parse_hook(hook) if isinstance(hook, str) else hook
    if point.kind == "resid_pre":
        return point.layer
    if point.kind == "resid_post":
        return point.layer + 1
    raise ValueError(f"only resid_pre/resid_post map to hidden_states, not {point.name!r}")


def hook_from_hidden_states_index(index: int) -> HookPoint:
    """Inverse of :func:`hidden_states_index`: 0 -> resid_pre.0, i>0 -> resid_post.{i-1}."""
    if index < 0:
        raise ValueError(f"hidden_states index must be >= 0, got {index}")
    return HookPoint("resid_pre", 0) if index == 0 else HookPoint("resid_post", index - 1)


def llama_cpp_direction_index(resid_post_layer: int) -> int:
    """llama.cpp adds control vector ``direction.N`` at the end of block ``N``: ``resid_post.L`` -> ``N = L``.

    llama.cpp rejects ``direction.0`` ("invalid (zero) direction tensor layer index"), so ``resid_post.0``
    cannot be exported; steer ``resid_post.1`` or later instead.
    """
    if resid_post_layer < 1:
        raise ValueError(f"resid_post.{resid_post_layer} has no llama.cpp control-vector slot: llama.cpp adds "
                         "direction.N after block N and rejects direction.0; steer resid_post.1 or later")
    return resid_post_layer


def resid_post_layer_from_llama_cpp(direction_index: int) -> int:
    """Inverse of :func:`llama_cpp_direction_index`; llama.cpp rejects index 0."""
    if direction_index < 1:
        raise ValueError(f"llama.cpp control vectors start at direction.1, got direction.{direction_index}")
    return direction_index
