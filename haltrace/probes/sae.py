"""Sparse autoencoders on haltrace activation stores: train (SAELens v6), save, load, check, encode.

Training never needs a HookedTransformer: SAELens' ``SAETrainer`` takes any iterator of ``[batch, d_in]``
tensors, and :class:`StoreSampler` gives it shuffled rows of one hook from one or more
:class:`~haltrace.trace.store.ActivationStore` folders, cycling forever. Every ``heldout_every``-th example
of each store is held out; L0, explained variance and dead latents are measured on those rows.

Saved SAEs are SAELens' own inference format (``sae_weights.safetensors`` + ``cfg.json``), so
``sae_lens.SAE.load_from_disk`` reads them. ``cfg.json`` metadata carries the TransformerLens hook name
(``hook_name``, SAELens' convention), the haltrace hook (``haltrace_hook``), the layer convention and the
model id; ``haltrace_train.json`` next to them holds the training report.

Example
-------
>>> import haltrace
>>> prompts = [f"{a} {b} circle is {c}" for a in ("the", "a") for b in ("red", "blue") for c in ("left", "right")]
>>> store = haltrace.harvest(model, [{"prompt": p} for p in prompts], ["resid_post.1"], positions="all",
...                          out="acts/", progress=False)
>>> sae, report = train_sae("acts/", "resid_post.1", d_sae=64, steps=20, batch_size=16, out="saes/l1",
...                         progress=False)
>>> report.d_in, report.d_sae, report.steps          # also report.explained_variance, .l0, .dead_latents
(32, 64, 20)
>>> sae = load_sae("saes/l1"); check_sae_fits(sae, model)
'resid_post.1'
>>> encode(sae, store.load("resid_post.1")).shape     # every stored token's latents
torch.Size([40, 64])
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from haltrace.conventions import parse_hook
from haltrace.errors import HaltraceError, share_tree

if TYPE_CHECKING:
    from sae_lens import SAE

    from haltrace.trace.store import ActivationStore

#: hook kinds an SAE can be trained on (one vector of the residual width per token)
SAE_HOOK_KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "projector_out",
                                   "vision_out")
LAYER_CONVENTION = ("haltrace: resid_post.i = output of decoder block i = HF hidden_states[i+1] = "
                    "TransformerLens blocks.i.hook_resid_post; resid_pre.i = input of block i = hidden_states[i]")
REPORT_FILE = "haltrace_train.json"


class SAEError(HaltraceError):
    """An SAE cannot be trained, loaded or applied as asked (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------- hook names
def tl_hook_name(hook: str) -> str:
    """haltrace hook -> TransformerLens / SAELens hook name (:func:`haltrace.conventions.tl_hook_name`).

    >>> tl_hook_name("resid_post.2")
    'blocks.2.hook_resid_post'
    """
    from haltrace import conventions

    return conventions.tl_hook_name(hook)


def haltrace_hook_name(name: str) -> str:
    """A TransformerLens hook name (``blocks.L.hook_resid_post``) or a haltrace name -> the haltrace name.

    >>> haltrace_hook_name("blocks.9.hook_resid_post"), haltrace_hook_name("resid_pre.3")
    ('resid_post.9', 'resid_pre.3')
    """
    if re.fullmatch(r"blocks\.\d+\..+", name):
        from haltrace.conventions import hook_from_tl_name

        try:
            return hook_from_tl_name(name).name
        except ValueError as err:
            raise SAEError(str(err)) from None
    try:
        return parse_hook(name).name
    except ValueError as err:
        raise SAEError(f"SAE hook {name!r} is neither a TransformerLens hook (blocks.L.hook_resid_post) nor a "
                       f"haltrace hook: {err}") from None


def _check_trainable_hook(hook: str) -> None:
    kind = parse_hook(hook).kind
    if kind not in SAE_HOOK_KINDS:
        raise SAEError(f"cannot train an SAE on {hook!r}: its rows are not one d_model vector per token; use one "
                       f"of {', '.join(SAE_HOOK_KINDS)}")


# ---------------------------------------------------------------------------------------- data provider
def open_stores(stores: str | os.PathLike | ActivationStore | Sequence[Any], hook: str) -> list[ActivationStore]:
    """Open store folders (or pass stores through) and check each holds ``hook`` with one common width."""
    from haltrace.trace.store import ActivationStore

    items = [stores] if isinstance(stores, str | os.PathLike | ActivationStore) else list(stores)
    if not items:
        raise SAEError("no activation store given; harvest one with haltrace.harvest(model, data, hooks, out=DIR)")
    opened = [s if isinstance(s, ActivationStore) else ActivationStore.open(s) for s in items]
    widths = set()
    for store in opened:
        if hook not in store.hooks:
            raise SAEError(f"store {store.root} has no hook {hook!r}; it holds {store.hooks}. Harvest {hook!r} "
                           f"or pick one of those hooks.")
        widths.add(store.shape(hook)[-1])
    if len(widths) != 1:
        raise SAEError(f"stores disagree on the width of {hook!r}: {sorted(widths)}; they come from different "
                       "models")
    return opened


def _example_chunks(store: ActivationStore, hook: str, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor,
                                                                                            torch.Tensor]]:
    """Yield ``(first example index, token rows [n, d], example index of each row)`` in store order."""
    ragged = store.is_ragged(hook)
    lengths = store.lengths() if ragged else None
    start = 0
    for block in store.iter_batches(hook, chunk):
        if ragged:
            # iter_batches yields ``chunk`` whole examples per block (fewer at the end)
            n_ex = min(chunk, len(store) - start)
            owner = torch.repeat_interleave(torch.arange(start, start + n_ex), lengths[start:start + n_ex])
            rows = block
        else:
            n_ex = block.shape[0]
            per = int(torch.tensor(block.shape[1:-1]).prod()) if block.dim() > 2 else 1
            rows = block.reshape(-1, block.shape[-1])
            owner = torch.arange(start, start + n_ex).repeat_interleave(per)
        yield start, rows.float(), owner
        start += n_ex


class StoreSampler:
    """Infinite iterator of shuffled ``[batch_size, d]`` rows of ``hook`` (SAELens' ``DataProvider``).

    Rows of the training examples are read chunk by chunk into a shuffle buffer of ``buffer_rows``; a store
    smaller than the buffer is fully reshuffled every epoch. Examples with ``index % heldout_every == 0``
    are never yielded (:meth:`heldout` returns them).

    >>> from haltrace.trace.harvest import harvest
    >>> data = [{"prompt": f"a red circle {'. ' * k}"} for k in range(20)]
    >>> store = harvest(model, data, ["resid_post.1"], positions="all", out="acts/", progress=False)
    >>> sampler = StoreSampler([store], "resid_post.1", batch_size=16)
    >>> next(sampler).shape
    torch.Size([16, 32])
    """

    def __init__(self, stores: Sequence[ActivationStore], hook: str, batch_size: int = 256, *,
                 heldout_every: int = 10, buffer_rows: int = 1 << 18, seed: int = 0):
        self.stores, self.hook, self.batch_size = list(stores), hook, batch_size
        self.heldout_every, self.buffer_rows = heldout_every, buffer_rows
        self.generator = torch.Generator().manual_seed(seed)
        self._iter = self._cycle()
        self.epochs = 0

    def _keep(self, owner: torch.Tensor, heldout: bool) -> torch.Tensor:
        if self.heldout_every <= 1:
            return torch.full_like(owner, not heldout, dtype=torch.bool)
        return (owner % self.heldout_every == 0) == heldout

    def _rows(self, heldout: bool) -> Iterator[torch.Tensor]:
        for store in self.stores:
            for _, rows, owner in _example_chunks(store, self.hook):
                yield rows[self._keep(owner, heldout)]

    def count(self, heldout: bool = False) -> int:
        """Number of token rows in the training (or held-out) part, summed over stores."""
        return sum(int(r.shape[0]) for r in self._rows(heldout))

    def heldout(self, max_rows: int | None = None) -> torch.Tensor:
        """The held-out rows ``[n, d]`` (first ``max_rows`` of them), for evaluation."""
        parts, n = [], 0
        for rows in self._rows(heldout=True):
            parts.append(rows)
            n += rows.shape[0]
            if max_rows is not None and n >= max_rows:
                break
        if not parts or n == 0:
            raise SAEError(f"no held-out rows: the stores have too few examples for heldout_every="
                           f"{self.heldout_every}")
        out = torch.cat(parts)
        return out[:max_rows] if max_rows is not None else out

    def _cycle(self) -> Iterator[torch.Tensor]:
        leftover: torch.Tensor | None = None
        while True:
            buffer = [] if leftover is None else [leftover]
            n = sum(int(b.shape[0]) for b in buffer)
            got = 0
            for rows in self._rows(heldout=False):
                got += rows.shape[0]
                buffer.append(rows)
                n += rows.shape[0]
                if n >= self.buffer_rows:
                    leftover = yield from self._drain(torch.cat(buffer))
                    buffer = [] if leftover is None else [leftover]
                    n = sum(int(b.shape[0]) for b in buffer)
            if got == 0:
                raise SAEError("the stores hold no training rows (all examples are held out); raise "
                               "heldout_every or harvest more examples")
            self.epochs += 1
            if n >= self.batch_size:
                leftover = yield from self._drain(torch.cat(buffer))
            else:  # fewer rows than one batch left: carry them into the next epoch
                leftover = torch.cat(buffer) if buffer else None

    def _drain(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield full shuffled batches from ``rows``; return the leftover rows (fewer than one batch)."""
        rows = rows[torch.randperm(rows.shape[0], generator=self.generator)]
        full = rows.shape[0] // self.batch_size * self.batch_size
        for i in range(0, full, self.batch_size):
            yield rows[i:i + self.batch_size]
        return rows[full:] if full < rows.shape[0] else None

    def __iter__(self) -> StoreSampler:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._iter)


# -------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def encode(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Latent activations ``[..., d_sae]`` of activations ``x`` (``[..., d_in]``), in batches, no grad.

    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=512))
    >>> encode(sae, torch.randn(10, sae.cfg.d_in)).shape
    torch.Size([10, 512])
    """
    if x.shape[-1] != sae.cfg.d_in:
        raise SAEError(f"activations have width {x.shape[-1]}, the SAE expects d_in={sae.cfg.d_in}")
    flat = x.reshape(-1, x.shape[-1])
    dtype = next(sae.parameters()).dtype
    out = [sae.encode(flat[i:i + batch_size].to(sae.device, dtype)) for i in range(0, flat.shape[0], batch_size)]
    acts = torch.cat(out) if out else torch.empty(0, sae.cfg.d_sae)
    return acts.reshape(*x.shape[:-1], sae.cfg.d_sae).to(x.device)


@torch.no_grad()
def sae_metrics(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """L0, explained variance (1 - SSE/SST around the rows' mean), MSE and dead latents on rows ``x``.

    A latent is dead when it fires (> 0) on none of the rows.

    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    >>> sorted(sae_metrics(sae, torch.randn(100, 32)))     # a trained SAE: explained_variance 0.93 or so
    ['dead_fraction', 'dead_latents', 'explained_variance', 'l0', 'mse', 'n_rows']
    """
    x = x.reshape(-1, x.shape[-1]).float()
    mean = x.mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(sae.device)
        acts = sae.encode(xb)
        recon = sae.decode(acts).float()
        sse += float((recon - xb).pow(2).sum())
        sst += float((xb - mean.to(xb.device)).pow(2).sum())
        l0 += float((acts > 0).sum())
        fired |= (acts > 0).any(0).cpu()
    n = x.shape[0]
    dead = int((~fired).sum())
    return {"l0": l0 / n, "explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"),
            "mse": sse / (n * x.shape[1]), "dead_latents": dead, "dead_fraction": dead / sae.cfg.d_sae,
            "n_rows": n}


# ------------------------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    """What :func:`train_sae` did and how good the result is (metrics on held-out rows)."""

    hook: str
    sae_hook_name: str
    model: str | None
    arch: str
    d_in: int
    d_sae: int
    k: int | None
    l1_coefficient: float | None
    lr: float
    batch_size: int
    steps: int
    samples: int
    train_rows: int
    heldout_rows: int
    epochs: float
    seconds: float
    l0: float
    explained_variance: float
    mse: float
    dead_latents: int
    dead_fraction: float
    stores: list[str]
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build_training_sae(arch: str, d_in: int, d_sae: int, k: int | None, l1: float, metadata: dict[str, Any]):
    from haltrace._optional import require

    lens = require("sae_lens", extra="sae", feature="training an SAE")
    StandardTrainingSAE, StandardTrainingSAEConfig = lens.StandardTrainingSAE, lens.StandardTrainingSAEConfig
    TopKTrainingSAE, TopKTrainingSAEConfig = lens.TopKTrainingSAE, lens.TopKTrainingSAEConfig
    SAEMetadata = require("sae_lens.saes.sae", extra="sae", feature="training an SAE").SAEMetadata

    # scale inputs to norm sqrt(d_in) while training (folded into the weights at the end), so one
    # l1 coefficient works across models whose residual streams have very different scales
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations="expected_average_only_in",
                  metadata=SAEMetadata(**metadata))
    if arch == "relu":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1, **common))
    if arch == "topk":
        if k is None or not 0 < k <= d_sae:
            raise SAEError(f"--arch topk needs 0 < k <= d_sae={d_sae}, got k={k}")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    raise SAEError(f"unknown SAE architecture {arch!r}; use 'relu' (L1-penalised ReLU) or 'topk'")


def train_sae(stores: Any, hook: str, d_sae: int, *, arch: str = "topk", k: int | None = 16,
              l1_coefficient: float = 5.0, lr: float = 1e-3, batch_size: int = 256, steps: int | None = None,
              samples: int | None = None, heldout_every: int = 10, seed: int = 0,
              out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
              model_name: str | None = None, num_threads: int | None = None) -> tuple[SAE, TrainReport]:
    """Train an SAE on ``hook`` rows of one or more activation stores with SAELens' ``SAETrainer``.

    Args:
        stores: a store folder, an :class:`ActivationStore`, or a list of them (same model).
        hook: haltrace hook name, e.g. ``"resid_post.2"``; every store must hold it.
        d_sae: number of latents. arch: ``"topk"`` (exactly ``k`` active latents per row; the default, as it
            needs no sparsity tuning) or ``"relu"`` (L1 on decoder-norm-weighted activations, weight
            ``l1_coefficient`` on inputs scaled to norm sqrt(d_in); L0 swings strongly with it).
            lr, batch_size: Adam learning rate, rows per step.
        steps / samples: training length (default: 10 passes over the training rows, clamped to 300..3000
            steps). heldout_every: every n-th example of each store is held out for the metrics.
        out: save folder (written atomically); ``overwrite`` replaces an existing one.
        model_name: model id for the metadata (default: the store manifest's model).
        num_threads: torch CPU threads while training (restored afterwards). On a shared machine 1 thread is
            often several times faster than oversubscribed cores, because the matrices are small.

    Returns:
        ``(sae, report)``: an inference ``sae_lens.SAE`` (weights on raw activations) and a :class:`TrainReport`.

    >>> from haltrace.trace.harvest import harvest
    >>> for name, words in (("text", "red blue green"), ("img", "circle square star")):
    ...     _ = harvest(model, [{"prompt": f"the {w} is left"} for w in words.split() * 4], ["resid_post.1"],
    ...                 positions="all", out=f"acts/{name}", progress=False)
    >>> sae, rep = train_sae(["acts/text", "acts/img"], "resid_post.1", 64, steps=5, batch_size=8, out="saes/l1",
    ...                      progress=False)
    >>> rep.train_rows + rep.heldout_rows   # both stores' token rows
    96
    """
    _check_trainable_hook(hook)
    opened = open_stores(stores, hook)
    if out is not None and Path(out).exists() and not overwrite:
        raise SAEError(f"{out} already exists; pass overwrite=True (--overwrite) or pick another folder")
    torch.manual_seed(seed)
    from haltrace._optional import require

    SAETrainerConfig = require("sae_lens.config", extra="sae", feature="training an SAE").SAETrainerConfig
    SAETrainer = require("sae_lens.training.sae_trainer", extra="sae", feature="training an SAE").SAETrainer

    d_in = opened[0].shape(hook)[-1]
    sampler = StoreSampler(opened, hook, batch_size, heldout_every=heldout_every, seed=seed)
    train_rows = sampler.count(heldout=False)
    if train_rows < batch_size:
        raise SAEError(f"only {train_rows} training rows of {hook!r}, fewer than one batch of {batch_size}; "
                       "harvest more examples (or positions='all') or lower batch_size")
    if steps is None:
        steps = samples // batch_size if samples is not None else min(3000, max(300, 10 * train_rows // batch_size))
        steps = max(1, steps)
    samples = steps * batch_size
    model = model_name or opened[0].manifest.get("model", {}).get("name_or_path")
    metadata = {"hook_name": tl_hook_name(hook), "haltrace_hook": hook, "model_name": model,
                "layer_convention": LAYER_CONVENTION, "haltrace_stores": [str(s.root) for s in opened]}
    training_sae = _build_training_sae(arch, d_in, d_sae, k, l1_coefficient, metadata)
    cfg = SAETrainerConfig(total_training_samples=samples, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
                           lr_scheduler_name="constant", lr_warm_up_steps=min(100, steps // 10),
                           lr_decay_steps=steps // 5, device="cpu", dead_feature_window=max(steps, 1),
                           feature_sampling_window=max(steps, 1),
                           # inputs are scaled to mean norm sqrt(d_in) (normalize_activations=
                           # 'expected_average_only_in'); SAELens' default estimates it from 1,000 batches
                           n_batches_for_norm_estimate=min(50, steps))
    trainer = SAETrainer(cfg=cfg, sae=training_sae, data_provider=sampler)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        started = time.perf_counter()
        _fit(trainer, progress)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(old_threads)
    sae = _to_inference(trainer.sae)
    metrics = sae_metrics(sae, sampler.heldout(max_rows=65_536))
    report = TrainReport(hook=hook, sae_hook_name=tl_hook_name(hook), model=model, arch=arch, d_in=d_in,
                         d_sae=d_sae, k=k if arch == "topk" else None,
                         l1_coefficient=l1_coefficient if arch == "relu" else None, lr=lr, batch_size=batch_size,
                         steps=steps, samples=samples, train_rows=train_rows, heldout_rows=metrics["n_rows"],
                         epochs=samples / train_rows, seconds=seconds, l0=metrics["l0"],
                         explained_variance=metrics["explained_variance"], mse=metrics["mse"],
                         dead_latents=metrics["dead_latents"], dead_fraction=metrics["dead_fraction"],
                         stores=[str(s.root) for s in opened], out=str(out) if out is not None else None)
    if out is not None:
        save_sae(trainer.sae, out, report, overwrite=overwrite)
    return sae, report


def _fit(trainer: Any, progress: bool) -> Any:
    """SAELens' own ``SAETrainer.fit()``: the activation-norm estimate over ``n_batches_for_norm_estimate``
    batches, the training loop, folding the norm scaling factor into the weights and the final metadata.

    Its tqdm bars go to stderr when ``progress``; otherwise they are discarded (warnings raised meanwhile are
    re-issued afterwards, so nothing but the bars is lost).
    """
    if progress:
        return trainer.fit()
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        trained = trainer.fit()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return trained


def _to_inference(training_sae: Any) -> SAE:
    """The inference SAE of a trained ``TrainingSAE``, via SAELens' own inference save format."""
    with tempfile.TemporaryDirectory(prefix="haltrace-sae-") as tmp:
        training_sae.save_inference_model(tmp)
        return _load_disk(tmp)


def _load_disk(path: str | os.PathLike, device: str = "cpu") -> SAE:
    """SAELens' loader behind plain-word checks: ``cfg.json`` must be a JSON object, every ``*.safetensors``
    a real safetensors file (never a pickle); whatever SAELens still rejects is named with the folder."""
    from safetensors import SafetensorError

    from haltrace._optional import require

    SAE = require("sae_lens", extra="sae", feature="loading an SAE").SAE

    from haltrace.steering.vector import VectorError, _check_container

    folder = Path(path)
    cfg_path = folder / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEError(f"{cfg_path} is not valid JSON ({err}); save the SAE again (`haltrace sae train`)") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object (SAELens' SAE config), got {type(cfg).__name__}")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            _check_container(weights)
        except VectorError as err:
            raise SAEError(str(err)) from None
    try:
        return SAE.load_from_disk(str(path), device=device)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise SAEError(f"{folder} is not a loadable SAELens SAE folder ({type(err).__name__}: {err}); check "
                       "cfg.json and sae_weights.safetensors, or train one with `haltrace sae train`") from None


# ------------------------------------------------------------------------------------------ save / load
def save_sae(training_sae: Any, out: str | os.PathLike, report: TrainReport | None = None, *,
             overwrite: bool = False) -> Path:
    """Write SAELens' inference format (+ ``haltrace_train.json``) to a temp folder, then rename it to ``out``.

    A crash leaves either no ``out`` or the previous one, never a half-written folder.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SAEError(f"{out} already exists; pass overwrite=True or pick another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        training_sae.save_inference_model(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        share_tree(tmp)  # mkdtemp makes the folder 0700: a shared SAE must be readable (0755 / 0644)
        old = None
        if out.exists():  # move the old folder aside first: os.replace cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_sae(source: str | os.PathLike, sae_id: str | None = None, *, device: str = "cpu") -> SAE:
    """Load an SAE from a local folder (SAELens format) or a SAELens release name + ``sae_id``.

    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> _ = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)).save_model("saes/l2")
    >>> load_sae("saes/l2").cfg.d_sae
    64
    >>> sae = load_sae("gemma-scope-2b-pt-res-canonical", "layer_9/width_16k/canonical")  # doctest: +SKIP
    """
    path = Path(source)
    if sae_id is None:
        if not (path / "cfg.json").is_file():
            hint = (" (a SAELens release name needs an sae_id / --sae-id too)" if not path.exists() else "")
            raise SAEError(f"{source} is not an SAE folder: cfg.json is missing{hint}. Train one with "
                           "`haltrace sae train` or pass a SAELens release name and id.")
        return _load_disk(path, device)
    from haltrace._optional import require

    SAE = require("sae_lens", extra="sae", feature="loading an SAE").SAE
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device)
    except Exception as err:  # offline: huggingface_hub raises several different errors; say what to do
        raise SAEError(f"could not load SAELens release {str(source)!r} id {sae_id!r}: {type(err).__name__}: "
                       f"{err}. Pretrained releases are downloaded from the Hugging Face Hub: this needs network "
                       "access, or the files already in the HF cache (HF_HUB_OFFLINE=1 only reads the cache). "
                       "Or train a local SAE with `haltrace sae train`.") from err


def sae_hook(sae: SAE) -> str:
    """The haltrace hook an SAE reads (from ``haltrace_hook`` or the TransformerLens ``hook_name``)."""
    meta = sae.cfg.metadata
    name = meta.get("haltrace_hook") or meta.get("hook_name")
    if not name:
        raise SAEError("this SAE's metadata names no hook (hook_name); pass the hook explicitly")
    return haltrace_hook_name(name)


def hook_width(model: Any, hook: str) -> int:
    """Width of one row of ``hook`` in ``model`` (residual-width hooks; vision_out is the vision tower's)."""
    point = parse_hook(hook, model.n_layers, vision=model.is_vlm)
    if point.kind == "vision_out":
        cfg = getattr(model.hf.config, "vision_config", None)
        return int(cfg.hidden_size)
    if point.kind not in SAE_HOOK_KINDS:
        raise SAEError(f"hook {hook!r} is not a residual-width hook; SAEs read {', '.join(SAE_HOOK_KINDS)}")
    return int(model.hidden_size)


def check_sae_fits(sae: SAE, model: Any, hook: str | None = None) -> str:
    """Raise :class:`SAEError` unless ``sae.cfg.d_in`` equals the width of ``hook`` in ``model``; return the hook.

    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> from sae_lens.saes.sae import SAEMetadata
    >>> sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    >>> check_sae_fits(sae, model)
    'resid_post.1'
    """
    hook = hook or sae_hook(sae)
    try:
        width = hook_width(model, hook)
    except ValueError as err:
        raise SAEError(f"SAE hook {hook!r} does not exist in {getattr(model, 'name_or_path', 'this model')}: "
                       f"{err}") from None
    if sae.cfg.d_in != width:
        raise SAEError(f"SAE d_in={sae.cfg.d_in} does not match {hook!r} of "
                       f"{getattr(model, 'name_or_path', 'the model')}, which is {width} wide; this SAE was "
                       f"trained on another model (metadata model: {sae.cfg.metadata.get('model_name')!r})")
    return hook
