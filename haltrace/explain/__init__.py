"""``haltrace.explain``: look at one answer, token by token, with maps over the image.

>>> import haltrace
>>> ex = haltrace.explain("shapes-llava", "caption_0000.png", "caption :", truth=["plate"])   # doctest: +SKIP
>>> ex.answer, [t["verdict"] for t in ex.tokens if "verdict" in t]                          # doctest: +SKIP
('cup yellow plate white', ['hallucinated', 'real'])
>>> ex.save("page.html")                                                                       # doctest: +SKIP

Any loaded model works the same way (here a tiny random one, so its answer means nothing):

>>> ex = haltrace.explain(model, img, "caption :", max_new_tokens=3)
>>> _ = ex.save("page.html")

In Jupyter the returned :class:`Explanation` shows itself (``_repr_html_``). See :mod:`haltrace.explain.core` for
what is computed and :mod:`haltrace.viz.explain_page` for the page.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Explanation", "explain", "load_image"]


class Explanation:
    """What :func:`explain` returns: ``data`` (a JSON-ready dict: model, prompt, image, patch grid, one or two
    answers with every token's numbers), ``to_html()``, ``save(path)``, ``to_json()``; shows itself in Jupyter."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def answers(self) -> list[dict[str, Any]]:
        return self.data["answers"]

    @property
    def answer(self) -> str:
        """The (unsteered) answer text."""
        return self.answers[0]["text"]

    @property
    def tokens(self) -> list[dict[str, Any]]:
        """The (unsteered) answer's tokens, each a dict of its numbers (see the page's legend)."""
        return self.answers[0]["tokens"]

    @property
    def grid(self) -> dict[str, Any]:
        return self.data["grid"]

    def map(self, token: int, layer: int | None = None, kind: str = "patch_prob", view: int = 0,
            answer: int = 0) -> list[list[float | None]]:
        """The map of ``token`` at ``layer`` as ``rows x cols`` of the grid view (``kind``: ``patch_prob``,
        ``patch_rank`` or ``attn_patch``); raises when the family has no spatial grid."""
        if not self.grid["spatial"]:
            raise ValueError(f"no spatial grid: {self.grid['note']}")
        layer = self.data["default_layer"] if layer is None else layer
        values = self.answers[answer]["tokens"][token][kind][layer]
        cells = self.grid["views"][view]["cells"]
        return [[values[c] if c >= 0 else None for c in row] for row in cells]

    def to_json(self) -> str:
        return json.dumps(self.data, allow_nan=False)

    def to_html(self) -> str:
        from haltrace.viz.explain_page import render_page

        return render_page(self.data)

    def save(self, path: str | Path) -> Path:
        """Write the self-contained page (plotly inlined, no CDN) atomically; returns the path."""
        from haltrace.trace.store import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_html())
        path.chmod(0o644)
        return path

    def _repr_html_(self) -> str:
        import html

        page = self.to_html()
        return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:980px;border:0" '
                'sandbox="allow-scripts"></iframe>')

    def __repr__(self) -> str:
        parts = [f"{a['label']}: {a['text']!r}" for a in self.answers]
        return f"Explanation({self.data['model']!r}, {'; '.join(parts)})"


def load_image(image: Any) -> Any:
    """A PIL RGB image from a path, a PIL image or an ``HxWx3`` uint8 array (``None`` stays ``None``)."""
    if image is None:
        return None
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np

    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _data_uri(image: Any, min_side: int = 256, max_side: int = 512) -> dict[str, Any]:
    """The image as a PNG data URI, small ones upscaled (nearest neighbour: pixels stay pixels), large ones
    shrunk; ``width``/``height`` are the displayed size, ``original`` the real one."""
    from PIL import Image

    w, h = image.size
    shown = image
    if max(w, h) < min_side:
        k = max(1, min_side // max(w, h))
        shown = image.resize((w * k, h * k), Image.NEAREST)
    elif max(w, h) > max_side:
        k = max_side / max(w, h)
        shown = image.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BICUBIC)
    buf = io.BytesIO()
    shown.save(buf, format="PNG")
    return {"data_uri": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "width": shown.size[0], "height": shown.size[1], "original": [w, h]}


def _prompt_text(model: Any, prompt: str, with_image: bool, template: str | None) -> str:
    from haltrace.models.prompting import build_prompt, image_placeholder

    placeholder = image_placeholder(model) if with_image else None
    if placeholder is not None and template is None:
        token = placeholder.strip()
        inner = getattr(model.processor, "image_token", None) or token
        if token in prompt or (isinstance(inner, str) and inner in prompt):
            return prompt  # already a full prompt with the image placeholder
    return build_prompt(model, prompt, image=with_image, template=template)


def _default_layer(answer: dict[str, Any], n_layers: int) -> int:
    """The layer where the tokens' best patch probability is highest on average (where the map says most)."""
    toks = [t for t in answer["tokens"] if "patch_prob" in t]
    if not toks:
        return n_layers - 1
    score = [sum(max(v for v in t["patch_prob"][layer] if v is not None) for t in toks) for layer in range(n_layers)]
    return max(range(n_layers), key=lambda i: (score[i], i))


def explain(model: Any, image: Any = None, prompt: str = "describe the image", *, detector: Any = None,
            probe: Any = None, probe_layer: int | None = None, truth: Sequence[str] | str | None = None,
            method: str | None = None, fitted: Any = None, max_new_tokens: int = 32, competitor: str | None = None,
            chair_table: Any = None, chair_rules: str | None = None, layer: int | None = None,
            template: str | None = None, top_k: int = 5, title: str | None = None) -> Explanation:
    """Generate the answer of ``model`` to ``prompt`` about ``image`` and explain every token.

    ``model``: a :class:`~haltrace.models.Model` or a name/path (loaded with eager attention, which the attention
    maps need). ``image``: a path, PIL image or array (``None``: text only). ``prompt``: a plain question (wrapped
    by the model's chat template with :func:`~haltrace.models.prompting.build_prompt`) or a full prompt holding
    the image placeholder. ``detector``: a fitted TruthPrInt folder or gate (its ``p(hallucinated)`` per token);
    ``probe``: a probe / steering vector (file or :class:`~haltrace.steering.vector.SteeringVector`; score = the
    projection on its unit direction at ``probe_layer``, default its best-AUROC layer); ``truth``: the objects
    really in the image (object words are then checked with CHAIR's rules: the organism's kinds for an
    organism, COCO's official synonym table otherwise, or ``chair_table``: a ``synonyms.txt`` path or a list
    of words). ``method`` (fit that steering method now) or ``fitted`` (a fitted intervention or its folder):
    the answer is also generated and explained under the intervention, and the changed words are marked.
    ``competitor``: a word whose lens rank is drawn next to each token's (default: the last layer's runner-up).
    ``layer``: the layer the page opens on.
    """
    import haltrace
    from haltrace.explain.core import (  # torch: imported on use, so `haltrace explain --help` stays fast
        _mark_changes,
        _resolve_detector,
        _resolve_probe,
        _resolve_steering,
        chair_table_for,
        explain_answer,
    )
    from haltrace.models.grids import no_grid

    began = time.perf_counter()
    if isinstance(model, (str, Path)):
        model = haltrace.load(str(model), attn_implementation="eager")
    started = time.perf_counter()
    if isinstance(truth, str):
        truth = [t.strip() for t in truth.split(",") if t.strip()]
    pil = load_image(image)
    if pil is not None and not model.is_vlm:
        raise ValueError(f"{model.name_or_path} is a text-only model; pass image=None")
    text = _prompt_text(model, prompt, pil is not None, template)
    inputs = model.prepare([text], images=[pil] if pil is not None else None)
    n_img = int(model.image_token_mask(inputs["input_ids"])[0].sum())
    if pil is None:
        grid = no_grid(model.adapter.family, 0, "no image in this prompt: nothing to map" if model.is_vlm
                       else "a text-only model: nothing to map")
    else:
        grid = model.adapter.patch_grid(inputs, n_img, 0, pil.size, model.processor)
    gate = _resolve_detector(detector)
    vec = _resolve_probe(probe, model)
    chair = chair_table_for(model, chair_table, chair_rules, truth or ()) if (truth is not None or chair_table
                                                                            is not None) else None
    if chair is None and truth is None:
        # objects are still found (and their internal confidence shown) when the model is an organism
        from haltrace.explain.core import _organism_vocabulary

        if _organism_vocabulary(model) is not None:
            chair = chair_table_for(model, None, chair_rules)
    common = dict(max_new_tokens=max_new_tokens, detector=gate, probe=vec, probe_layer=probe_layer, truth=truth,
                  chair=chair, competitor=competitor, top_k=top_k)
    answers = [explain_answer(model, inputs, label="answer", **common)]
    steering = None
    steer = _resolve_steering(model, method, fitted)
    if steer is not None:
        name = getattr(steer, "method", "steered")
        after = explain_answer(model, inputs, label=f"after steering ({name})",
                               context=lambda: steer.apply(model), generate_kwargs=steer.generate_kwargs, **common)
        answers.append(after)
        steering = {"method": name, "source": "fitted now" if method is not None else str(fitted)
                    if isinstance(fitted, (str, Path)) else "given", **_mark_changes(answers[0], after)}
    n_layers = model.n_layers
    default_layer = layer if layer is not None else _default_layer(answers[0], n_layers)
    if not 0 <= default_layer < n_layers:
        raise ValueError(f"layer {default_layer} out of range; this model has layers 0..{n_layers - 1}")
    scores = {}
    if gate is not None:
        scores["detector"] = {"label": "TruthPrInt detector p(hallucinated)", "layers": list(gate.layers),
                              "threshold": float(getattr(gate, "threshold", 0.5)), "range": [0.0, 1.0]}
    if vec is not None:
        lay = answers[0]["probe_layer"]
        scores["probe"] = {"label": f"probe projection at resid_post.{lay}", "layer": lay,
                           "method": getattr(vec, "method", ""), "range": None}
    if grid.spatial:
        scores["confidence"] = {"label": "internal confidence c_o (max lens p over layers and patches)",
                                "range": None}
    data = {
        "haltrace": haltrace.__version__, "title": title, "model": str(model.name_or_path),
        "family": model.adapter.family, "n_layers": n_layers, "layers": [f"resid_post.{i}" for i in range(n_layers)],
        "prompt": prompt, "prompt_text": text, "image": _data_uri(pil) if pil is not None else None,
        "grid": grid.as_dict(), "answers": answers, "steering": steering, "scores": scores,
        "default_layer": default_layer, "truth": list(truth) if truth is not None else None,
        "chair": None if chair is None else {"rules": chair[1], "table": chair[2]},
        "seconds": time.perf_counter() - started, "load_seconds": started - began,
    }
    return Explanation(data)


class _CallableModule(types.ModuleType):
    """``haltrace.explain`` is this package, and calling it calls :func:`explain` (the package attribute would
    otherwise shadow the function once the package is imported)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
