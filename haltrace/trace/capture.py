"""Capture activations with plain PyTorch hooks: one no-grad forward, hooks always removed afterwards.

>>> model = haltrace.load("shapes-llava", attn_implementation="eager")      # doctest: +SKIP
>>> cap = model.capture(model.prepare(["a red circle"]), ["resid_post.1", "attn_pattern.0"],
...                     positions="last")
>>> cap["resid_post.1"].shape, cap["attn_pattern.0"].shape
(torch.Size([1, 1, 32]), torch.Size([1, 4, 1, 3]))

Shapes (``P`` = selected positions, ``T`` = all tokens): ``resid_pre/resid_post/attn_out/mlp_out``
``[B, P, d]``; ``head_out`` ``[B, P, n_heads, head_dim]``; ``attn_pattern`` ``[B, n_heads, P, T]`` (eager
attention only); ``vision_out``/``projector_out`` ``[n_images, n_tokens, d]`` (positions ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from haltrace.conventions import HookPoint, parse_hook
from haltrace.models.adapters.base import Site, first_tensor, hidden_states_in, last_real_token

if TYPE_CHECKING:
    from haltrace.models.base import Model

#: what ``positions`` may be
PositionSpec = None | str | int | Sequence[int] | torch.Tensor


class Capture(dict):
    """Hook name -> captured tensor (detached, on the model's device), plus the forward's ``output``.

    Keys are canonical names (``"resid_post.1"``); lookups also accept aliases such as ``"resid_post.-1"``.
    ``positions`` is the resolved ``LongTensor[B, P]`` (``None`` when all positions were kept).
    """

    def __init__(self, *args: Any, output: Any = None, positions: torch.Tensor | None = None,
                 n_layers: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.output = output
        self.positions = positions
        self._n_layers = n_layers

    def _canonical(self, key: Any) -> Any:
        if isinstance(key, str) and not super().__contains__(key):
            try:
                return parse_hook(key, self._n_layers).name
            except ValueError:
                return key
        return key

    def __getitem__(self, key: Any) -> torch.Tensor:
        return super().__getitem__(self._canonical(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._canonical(key))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.items())
        return f"Capture({{{shapes}}}, positions={None if self.positions is None else tuple(self.positions.shape)})"


# --- generic hook plumbing ---------------------------------------------------------------------------------

@contextmanager
def temporary_hooks(
    forward: Sequence[tuple[torch.nn.Module, Callable[..., Any]]] = (),
    pre: Sequence[tuple[torch.nn.Module, Callable[..., Any]]] = (),
    *,
    with_kwargs: bool = False,
) -> Iterator[list[Any]]:
    """Register forward (``fn(module, args, output)``) and pre (``fn(module, args)``) hooks for a block.

    Every handle is removed on exit, also when the body or a hook raises. With ``with_kwargs=True`` the
    signatures gain ``kwargs`` (``fn(module, args, kwargs, output)`` / ``fn(module, args, kwargs)``).

    >>> with temporary_hooks(forward=[(model.hf.lm_head, lambda m, a, o: print(o.shape))]):
    ...     _ = model.hf(**inputs)
    torch.Size([2, 9, 54])
    """
    handles: list[Any] = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        for module, fn in forward:
            handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# --- positions ---------------------------------------------------------------------------------------------

def _seq_shape(inputs: Mapping[str, Any]) -> tuple[int, int]:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = inputs.get(key)
        if value is not None:
            return int(value.shape[0]), int(value.shape[1])
    raise ValueError("inputs need input_ids, inputs_embeds or attention_mask to resolve positions")


def resolve_positions(
    positions: PositionSpec,
    inputs: Mapping[str, Any],
    image_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Turn a positions spec into ``LongTensor[B, P]`` (``None`` for all positions).

    ``"last"``: last non-pad token per row (from ``attention_mask``; left or right padding). ``int`` /
    ``list[int]``: indices into the padded sequence, negative from the end. ``"image"``: image-token positions
    (rows must hold the same number). A ``LongTensor[B, P]`` is taken per row.

    >>> resolve_positions("last", {"input_ids": torch.zeros(2, 5, dtype=torch.long)}).tolist()
    [[4], [4]]
    """
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    batch, seq = _seq_shape(inputs)
    ids = inputs.get("input_ids")
    device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))

    def check(index: torch.Tensor) -> torch.Tensor:
        bad = (index < -seq) | (index >= seq)
        if bool(bad.any()):
            raise ValueError(f"position {index[bad][0].item()} out of range: the sequence has {seq} tokens, "
                             f"valid positions are 0..{seq - 1} (or -{seq}..-1 from the end)")
        return torch.where(index < 0, index + seq, index)

    if isinstance(positions, str):
        if positions == "last":
            mask = inputs.get("attention_mask")
            if mask is None:
                return torch.full((batch, 1), seq - 1, dtype=torch.long, device=device)
            return last_real_token(mask).view(batch, 1).to(device)
        if positions == "image":
            if image_mask is None or ids is None:
                raise ValueError("positions='image' needs input_ids and a vision-language model")
            mask = image_mask(ids)
            counts = mask.sum(dim=1).tolist()
            if len(set(counts)) != 1:
                raise ValueError(f"positions='image': rows hold different numbers of image tokens {counts}; "
                                 "capture them one row at a time or pass a LongTensor of positions")
            if counts[0] == 0:
                raise ValueError("positions='image': no image tokens in input_ids")
            return mask.nonzero()[:, 1].view(batch, counts[0]).to(device)
        raise ValueError(f"unknown positions {positions!r}; use None/'all', 'last', 'image', an int, "
                         "a list of ints or a LongTensor[B, P]")
    if isinstance(positions, torch.Tensor):
        index = positions.to(device=device, dtype=torch.long)
        if index.dim() == 1:
            index = index.unsqueeze(0).expand(batch, -1)
        if index.dim() != 2 or index.shape[0] != batch:
            raise ValueError(f"positions tensor must be [B={batch}, P] or [P], got {tuple(positions.shape)}")
        return check(index)
    if isinstance(positions, int):
        positions = [positions]
    try:
        index = torch.tensor(list(positions), dtype=torch.long, device=device)
    except (TypeError, ValueError):
        raise ValueError(f"positions must be None, 'all', 'last', 'image', int, list[int] or a LongTensor, "
                         f"got {positions!r}") from None
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"positions list must be a non-empty flat list of ints, got {positions!r}")
    return check(index).unsqueeze(0).expand(batch, -1)


def _select(x: torch.Tensor, pos: torch.Tensor | None, seq_dim: int = 1) -> torch.Tensor:
    """Pick ``pos[b]`` along ``seq_dim`` for each row ``b`` (a copy either way, detached)."""
    x = x.detach()
    if pos is None:
        return x.clone()
    if seq_dim != 1:
        x = x.movedim(seq_dim, 1)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    out = x[rows, pos.to(x.device)]
    return out.movedim(1, seq_dim) if seq_dim != 1 else out


# --- the hooks ---------------------------------------------------------------------------------------------

#: parsed hook lists by (names, n_layers, vision): a capture is often repeated with the same names (harvest
#: batches, benchmarks, generation steps), and on a sub-millisecond forward parsing them each time shows up
_PARSED: dict[tuple[tuple[str, ...], int, bool], tuple[HookPoint, ...]] = {}
_PARSED_MAX = 512


def _parse_names(names: tuple[str, ...], n_layers: int, vision: bool) -> tuple[HookPoint, ...]:
    key = (names, n_layers, vision)
    points = _PARSED.get(key)
    if points is None:
        unique: list[HookPoint] = []
        for name in names:
            point = parse_hook(name, n_layers, vision=vision)
            if point not in unique:
                unique.append(point)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        points = _PARSED[key] = tuple(unique)
    return points


def parse_hooks(model: Model, hooks: Sequence[str] | str) -> list[HookPoint]:
    """Validate hook names against ``model`` (ValueError listing the valid names) and drop duplicates."""
    names = (hooks,) if isinstance(hooks, str) else tuple(hooks)
    n_layers, vision = model.n_layers, model.is_vlm
    if not all(isinstance(n, str) for n in names):  # not cacheable; parse_hook raises the clear error
        for name in names:
            parse_hook(name, n_layers, vision=vision)
    points = _parse_names(names, n_layers, vision)
    if any(p.kind == "attn_pattern" for p in points):
        impl = model.adapter.attn_implementation
        if impl != "eager":
            raise ValueError(f"attn_pattern needs eager attention, but this model runs {impl!r} (transformers 5 "
                             "returns no attention weights from sdpa/flash kernels); load it with "
                             "haltrace.load(..., attn_implementation=\"eager\")")
    return list(points)


def _output_of(out: Any) -> torch.Tensor:
    return out if type(out) is torch.Tensor else first_tensor(out)


def _install(model: Model, points: Sequence[HookPoint], positions: torch.Tensor | None, cap: Capture,
             accumulate: bool, handles: list[Any]) -> None:
    """Register the hooks that fill ``cap``; each handle is appended to ``handles`` as soon as it exists, so
    the caller's ``finally`` removes them all even when registration fails halfway."""
    adapter = model.adapter

    def put(name: str, value: torch.Tensor) -> None:
        if accumulate:
            cap.setdefault(name, []).append(value)
        else:
            cap[name] = value

    def on_output(site: Site) -> Callable[..., None]:
        name, seq_dim = site.point.name, site.seq_dim
        # the common case (all positions, one forward) stores straight into the dict: this hook runs once per
        # block per forward, and its cost is the whole capture overhead on small models
        if positions is None and not accumulate:
            def hook(_m: Any, _a: tuple, out: Any) -> None:
                cap[name] = _output_of(out).detach().clone()
        else:
            def hook(_m: Any, _a: tuple, out: Any) -> None:
                put(name, _select(_output_of(out), positions, seq_dim))
        return hook

    def on_input(site: Site) -> Callable[..., None]:
        name = site.point.name

        def hook(_m: Any, a: tuple, kw: dict) -> None:
            put(name, site.view(_select(hidden_states_in(a, kw), positions, site.seq_dim)))
        return hook

    def on_read(site: Site) -> Callable[..., None]:
        # any other output element (attn_pattern's weights) or a family's own reader
        name = site.point.name

        def hook(_m: Any, a: tuple, kw: dict, out: Any) -> None:
            put(name, site.view(_select(site.read(a, kw, out), positions, site.seq_dim)))
        return hook

    for point in points:
        site = adapter.site(point)
        if site.per_image:  # image-level rows: positions do not apply
            def sink(x: torch.Tensor, _name: str = point.name) -> None:
                put(_name, x.detach().clone())
            handles.append(site.register(sink))
        elif site.kind == "pre":
            handles.append(site.module.register_forward_pre_hook(on_input(site), with_kwargs=True))
        elif site.output_index == 0 and site.reader is None:
            handles.append(site.module.register_forward_hook(on_output(site)))
        else:
            handles.append(site.module.register_forward_hook(on_read(site), with_kwargs=True))


@contextmanager
def hooks(model: Model, hook_names: Sequence[str] | str, positions: torch.Tensor | None = None, *,
          accumulate: bool = False) -> Iterator[Capture]:
    """Context manager: while open, every forward of ``model.hf`` fills the yielded :class:`Capture`.

    ``positions`` must already be resolved (``resolve_positions``) or ``None``. A hook that fires again (e.g.
    during ``generate``) overwrites its entry, unless ``accumulate=True``: then each entry is a list with one
    tensor per call. Hooks are removed on exit.

    >>> with hooks(model, ["resid_post.0"]) as cap:
    ...     _ = model.hf(**inputs)
    >>> cap["resid_post.0"].shape
    torch.Size([2, 9, 32])
    """
    points = parse_hooks(model, hook_names)
    cap = Capture(positions=positions, n_layers=model.n_layers)
    handles: list[Any] = []
    try:
        _install(model, points, positions, cap, accumulate, handles)
        yield cap
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: Model,
    inputs: Mapping[str, Any],
    hooks_: Sequence[str] | str,
    positions: PositionSpec = None,
    **forward_kwargs: Any,
) -> Capture:
    """Run one no-grad forward of ``model`` on ``inputs`` and return the requested activations.

    >>> cap = capture(model, model.prepare("a red circle"), ["resid_post.0", "head_out.1"], positions="last")
    >>> cap["resid_post.0"].shape, cap["head_out.1"].shape
    (torch.Size([1, 1, 32]), torch.Size([1, 1, 4, 8]))
    """
    from haltrace.models.weights import has_meta_weights

    if has_meta_weights(model):  # load(..., remote=True): no weights here; Model.capture dispatches to nnsight
        raise ValueError("this model was loaded with remote=True (no local weights): call model.capture(...), "
                         "which runs the forward remotely through the nnsight backend")
    pos = resolve_positions(positions, inputs, model.image_token_mask)
    points = parse_hooks(model, hooks_)
    cap = Capture(positions=pos, n_layers=model.n_layers)
    handles: list[Any] = []
    # one try/finally rather than the hooks() context manager: same guarantee, less per-call overhead
    try:
        _install(model, points, pos, cap, False, handles)
        with torch.no_grad():
            cap.output = model.hf(**inputs, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(cap) < len(points):
        missing = [p.name for p in points if not dict.__contains__(cap, p.name)]
        raise RuntimeError(f"hooks {missing} did not fire during the forward (no images in the inputs?)")
    return cap
