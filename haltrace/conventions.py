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

Every such name is written only here: TransformerLens / SAELens (:func:`tl_hook_name`,
:func:`tl_bridge_hook_name`, :func:`hook_from_tl_name`), Hugging Face ``hidden_states`` (:func:`hidden_states_index`),
llama.cpp (:func:`llama_cpp_direction_index`, :func:`llama_cpp_tensor_name`). Which *module* a hook point reads on
a given family is the model adapter's business (``Adapter.site``).

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
#: Steering-only sites (the engine edits them; capture does not offer them): the model's output logits
#: (decoding-side edits such as DoLa's contrast or VISTA's logit mixing) and, in a VLM, the vision tower's
#: blocks ``K = 0 .. n_vision_blocks-1`` (their output, or their MLP's output; VTI's visual edit).
LOGITS_HOOK = "logits"
VISION_BLOCK_HOOKS: tuple[str, ...] = ("vision_resid_post", "vision_mlp_out")


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


def parse_hook(name: str, n_layers: int | None = None, *, vision: bool = True,
               kinds: tuple[str, ...] | None = None) -> HookPoint:
    """Parse and validate a hook name such as ``"resid_post.3"`` or ``"projector_out"``.

    Negative layers count from the end when ``n_layers`` is known (``resid_post.-1`` is the last block).
    Raises ``ValueError`` naming the valid hooks when the name or layer is unknown. ``kinds`` parses another
    family of layer-indexed names instead (e.g. :data:`VISION_BLOCK_HOOKS` with the vision tower's block count).
    """
    if kinds is not None:
        kind, _, index = str(name).partition(".")
        if kind not in kinds or not index.lstrip("-").isdigit():
            raise ValueError(f"hook {name!r}: expected one of {', '.join(k + '.<index>' for k in kinds)}")
        layer = int(index) + (n_layers if int(index) < 0 and n_layers else 0)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(f"hook {name!r}: index out of range 0..{n_layers - 1}")
        return HookPoint(kind, layer)
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


def llama_cpp_tensor_name(direction_index: int) -> str:
    """The GGUF tensor name llama.cpp reads for control-vector slot ``N``: ``direction.N``.

    >>> llama_cpp_tensor_name(llama_cpp_direction_index(2))
    'direction.2'
    """
    return f"{LLAMA_CPP_TENSOR_PREFIX}.{int(direction_index)}"


def llama_cpp_index_from_tensor_name(name: str) -> int:
    """``direction.N`` -> ``N``; ``ValueError`` for any other tensor name (llama.cpp rejects those).

    >>> llama_cpp_index_from_tensor_name("direction.7")
    7
    """
    prefix, _, index = str(name).partition(".")
    if prefix != LLAMA_CPP_TENSOR_PREFIX or not index.isdigit():
        raise ValueError(f"tensor {name!r} is not named {LLAMA_CPP_TENSOR_PREFIX}.<N>; llama.cpp rejects it")
    return int(index)


#: llama.cpp control vectors hold one tensor ``direction.<N>`` per steered block
LLAMA_CPP_TENSOR_PREFIX = "direction"


# --- TransformerLens / SAELens ---------------------------------------------------------------------------
#: haltrace hook kind -> TransformerLens hook, as ``HookedTransformer.hook_dict`` names it in TransformerLens 3.9
#: (``blocks.{layer}.<suffix>``). SAELens' ``cfg.metadata.hook_name`` uses the same names. The
#: ``TransformerBridge`` offers all of them too (``hook_attn_out`` / ``hook_mlp_out`` as aliases, see
#: :data:`TL_BRIDGE_MODULE_OUTPUTS`).
TL_HOOK_SUFFIXES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "head_out": "attn.hook_z",
    "attn_pattern": "attn.hook_pattern",
}
#: ``TransformerBridge`` hooks on the attention / MLP *module* outputs, i.e. haltrace's ``attn_out`` / ``mlp_out``
#: on every family. The bridge's ``blocks.L.hook_attn_out`` / ``hook_mlp_out`` alias these, except on
#: sandwich-norm families (Gemma 2/3), where TransformerLens takes them after the post-attention /
#: post-feedforward norm (as ``HookedTransformer`` does) and they are not haltrace's tensors.
TL_BRIDGE_MODULE_OUTPUTS: dict[str, str] = {"attn_out": "attn.hook_out", "mlp_out": "mlp.hook_out"}
#: ``TransformerBridge`` hooks for the global VLM hooks (``HookedTransformer`` has no vision tower)
TL_BRIDGE_VISION_HOOKS: dict[str, str] = {"vision_out": "vision_projector.hook_in",
                                          "projector_out": "vision_projector.hook_out"}


def tl_hook_name(hook: HookPoint | str) -> str:
    """haltrace hook -> TransformerLens (``HookedTransformer``) / SAELens hook name.

    Global VLM hooks have no TransformerLens name and keep haltrace's (``projector_out``).

    >>> tl_hook_name("resid_post.2"), tl_hook_name("attn_out.0"), tl_hook_name("head_out.1")
    ('blocks.2.hook_resid_post', 'blocks.0.hook_attn_out', 'blocks.1.attn.hook_z')
    """
    point = parse_hook(hook) if isinstance(hook, str) else hook
    if point.layer is None:
        return point.kind
    return f"blocks.{point.layer}.{TL_HOOK_SUFFIXES[point.kind]}"


def tl_bridge_hook_name(hook: HookPoint | str) -> str:
    """haltrace hook -> the ``TransformerBridge`` hook that holds exactly haltrace's tensor on every family.

    Same as :func:`tl_hook_name` except ``attn_out`` / ``mlp_out`` (the module outputs, also on Gemma 2/3) and
    the vision hooks (the bridge's ``vision_projector``).

    >>> tl_bridge_hook_name("attn_out.1"), tl_bridge_hook_name("resid_pre.0"), tl_bridge_hook_name("projector_out")
    ('blocks.1.attn.hook_out', 'blocks.0.hook_resid_pre', 'vision_projector.hook_out')
    """
    point = parse_hook(hook) if isinstance(hook, str) else hook
    if point.layer is None:
        return TL_BRIDGE_VISION_HOOKS[point.kind]
    suffix = TL_BRIDGE_MODULE_OUTPUTS.get(point.kind, TL_HOOK_SUFFIXES[point.kind])
    return f"blocks.{point.layer}.{suffix}"


def hook_from_tl_name(name: str) -> HookPoint:
    """A TransformerLens / SAELens hook name (``blocks.L.hook_resid_post``; the bridge's module-output names too)
    -> haltrace's hook. ``ValueError`` naming the known names for any other.

    >>> hook_from_tl_name("blocks.9.hook_resid_post"), hook_from_tl_name("blocks.1.attn.hook_out")
    (HookPoint(kind='resid_post', layer=9), HookPoint(kind='attn_out', layer=1))
    """
    prefix, layer, suffix = (str(name).split(".", 2) + ["", ""])[:3]
    if prefix == "blocks" and layer.isdigit():
        for table in (TL_HOOK_SUFFIXES, TL_BRIDGE_MODULE_OUTPUTS):
            for kind, known in table.items():
                if suffix == known:
                    return HookPoint(kind, int(layer))
    for kind, known in TL_BRIDGE_VISION_HOOKS.items():
        if name == known:
            return HookPoint(kind)
    raise ValueError(f"TransformerLens hook {name!r} has no haltrace equivalent; known TransformerLens hooks: "
                     f"{', '.join('blocks.L.' + s for s in TL_HOOK_SUFFIXES.values())}")
