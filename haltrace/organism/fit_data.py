"""The organism as a data source: each method's default fit data, as typed items (``haltrace.data``).

These builders draw fresh scenes with their own seeds (never the held-out evaluation sets) and yield the same
items a user writes in JSONL; ``haltrace organism eval --write-sets DIR`` writes them to ``DIR/fit/<method>.jsonl``
so a fit from those files is the same fit (tested). Methods never import this module: the data layer finds it
through :func:`haltrace.data.sources.default_fit_data` when a method is fitted without ``data``.

>>> from haltrace.organism.world import ShapesWorld
>>> items = fit_items(ShapesWorld(), "caa", n_images=2)
>>> items[0].kind, items[0].question
('yesno', 'is there a fork ?')
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from haltrace.data.items import CaptionItem, CaptionPair, PvPItem, VQAQuestion, YesNoQuestion
from haltrace.organism import tasks
from haltrace.organism.world import ShapesWorld

#: seeds of the fit data (the held-out eval sets use tasks.EVAL_SEED); kept from the methods' own defaults
YESNO_SEED = 4242
PVP_SEED = 12345
VTI_SEED = 12345
ERASURE_SEED = 12345 + 3

#: methods -> default fit-set size (images); "truthprint-yesno" is TruthPrInt's yes/no variant
DEFAULT_SIZES = {"truthprint": 600, "truthprint-yesno": 1000, "iti": 300, "caa": 300, "vhr": 100, "pvp": 64,
                 "vti": 48, "erasure": 48}
DATA_FREE = ("vista", "dola")


def _pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def yesno_questions(world: ShapesWorld, n_images: int = 300, seed: int = YESNO_SEED) -> list[YesNoQuestion]:
    """Per image one present object, one absent partner (when the scene holds an anchor without its partner)
    and one random absent object; half the images are POPE-style stress scenes, half training-like scenes.
    ``category``: "present", "partner" or "absent"."""
    rng = np.random.default_rng(seed)
    kinds = list(world.config.kinds)
    out: list[YesNoQuestion] = []
    for idx in range(n_images):
        if idx % 2 == 0:
            scene, _anchor = tasks.fit_anchor_scene(world, rng, max_other=2)
        else:
            scene = world.sample_scene(rng)
        image = _pil(world.render(scene, rng))
        present = sorted(scene.kinds)
        absent = [k for k in kinds if k not in scene.kinds]
        partners = sorted({world.partner[k] for k in present if k in world.partner} - scene.kinds)
        asked = [(present[int(rng.integers(len(present)))], "present")]
        if partners:
            asked.append((partners[int(rng.integers(len(partners)))], "partner"))
        rest = [k for k in absent if k not in partners] or absent
        asked.append((rest[int(rng.integers(len(rest)))], "absent"))
        for kind, category in asked:
            out.append(YesNoQuestion(tasks.yesno_question(kind), "yes" if category == "present" else "no", image,
                                     image_id=idx, object=kind, category=category))
    return out


def caption_items(world: ShapesWorld, n_images: int = 600, seed: int = YESNO_SEED) -> list[CaptionItem]:
    """Images with their ground-truth objects for captioning (TruthPrInt labels the model's own captions):
    half POPE-style stress scenes (an anchor without its partner), half training-like scenes."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in range(n_images):
        if idx % 2 == 0:
            scene, _anchor = tasks.fit_anchor_scene(world, rng, max_other=2)
        else:
            scene = world.sample_scene(rng)
        out.append(CaptionItem(_pil(world.render(scene, rng)), sorted(scene.kinds), image_id=idx,
                               prompt=tasks.CAPTION_PROMPT))
    return out


def vhr_items(world: ShapesWorld, n_images: int = 100, seed: int = YESNO_SEED) -> list[Any]:
    """One caption prompt per image, then the yes/no questions (VHR scores heads on both)."""
    questions = yesno_questions(world, n_images, seed)
    captions: list[Any] = []
    seen: set[int] = set()
    for q in questions:
        if q.image_id not in seen:
            seen.add(q.image_id)
            objects = sorted({x.object for x in questions if x.image_id == q.image_id and x.label == "yes"})
            captions.append(CaptionItem(q.image, objects, image_id=q.image_id, prompt=tasks.CAPTION_PROMPT))
    return captions + list(questions)


def pvp_items(world: ShapesWorld, n: int = 64, seed: int = PVP_SEED, n_control: int = 48) -> list[Any]:
    """Counterfactual images (a canonical-colour kind painted another colour, plus 0-2 plain objects) asked
    "this" and "most" ways, then colour-control questions on kinds without a prior (seed + 1)."""
    rng = np.random.default_rng(seed)
    cfg = world.config
    canon = sorted(cfg.canonical)
    plain = [k for k in cfg.kinds if k not in cfg.canonical]
    items: list[Any] = []
    for i in range(n):
        kind = canon[i % len(canon)]
        prior = cfg.canonical[kind]
        pixel = str(rng.choice([c for c in cfg.colours if c != prior]))
        others = [str(k) for k in rng.permutation(plain)[: int(rng.integers(0, 3))]]
        scene = world.make_scene([kind] + others, rng, colours={kind: pixel})
        items.append(PvPItem(_pil(world.render(scene, rng)), tasks.colour_question(kind),
                             tasks.prior_colour_question(kind), prior, pixel, image_id=i, attribute="color"))
    rng = np.random.default_rng(seed + 1)
    for j in range(n_control):
        scene = world.make_scene([str(k) for k in rng.permutation(plain)[: int(rng.integers(1, 4))]], rng)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        items.append(VQAQuestion(tasks.colour_question(obj.kind), obj.colour, _pil(world.render(scene, rng)),
                                 image_id=f"control-{j}"))
    return items


def vti_items(world: ShapesWorld, n: int = 48, seed: int = VTI_SEED) -> list[Any]:
    """Caption pairs (the truthful caption vs the same caption with the absent partner inserted, random colour,
    in the caption's kind order) on anchor-without-partner images, then POPE-style fit questions (seed + 7:
    the present object and the absent partner per image)."""
    rng = np.random.default_rng(seed)
    cfg = world.config
    items: list[Any] = []
    for i in range(n):
        scene, anchor = tasks.fit_anchor_scene(world, rng, max_other=1)
        partner = world.partner[anchor]
        colours = {o.kind: o.colour for o in scene.objects}
        colours[partner] = str(cfg.colours[int(rng.integers(len(cfg.colours)))])
        bad = " ".join(f"{k} {colours[k]}" for k in cfg.kinds if k in colours)
        items.append(CaptionPair(_pil(world.render(scene, rng)), world.caption_text(scene), bad, image_id=i,
                                 prompt=tasks.CAPTION_PROMPT))
    rng = np.random.default_rng(seed + 7)
    for i in range(64):
        scene, anchor = tasks.fit_anchor_scene(world, rng, max_other=2)
        image = _pil(world.render(scene, rng))
        present = sorted(scene.kinds)[int(rng.integers(len(scene.kinds)))]
        items.append(YesNoQuestion(tasks.yesno_question(present), "yes", image, image_id=f"pope-{i}",
                                   object=present, category="present"))
        items.append(YesNoQuestion(tasks.yesno_question(world.partner[anchor]), "no", image,
                                   image_id=f"pope-{i}", object=world.partner[anchor], category="partner"))
    return items


def erasure_items(world: ShapesWorld, n: int = 48, seed: int = ERASURE_SEED) -> list[CaptionItem]:
    """Anchor-without-partner images plus 0-1 unpaired objects (as the caption set), with their objects."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene, _anchor = tasks.fit_anchor_scene(world, rng, max_other=1)
        out.append(CaptionItem(_pil(world.render(scene, rng)), sorted(scene.kinds), image_id=i,
                               prompt=tasks.CAPTION_PROMPT))
    return out


def fit_items(world: ShapesWorld, method: str, *, n_images: int | None = None, seed: int | None = None
              ) -> list[Any]:
    """The default fit items of ``method`` on ``world`` (``[]`` for methods that learn nothing from data)."""
    if method in DATA_FREE:
        return []
    n = n_images if n_images is not None else DEFAULT_SIZES.get(method)
    if method == "truthprint":
        return caption_items(world, n, YESNO_SEED if seed is None else seed)
    if method in ("truthprint-yesno", "iti", "caa"):
        return yesno_questions(world, n, YESNO_SEED if seed is None else seed)
    if method == "vhr":
        return vhr_items(world, n, YESNO_SEED if seed is None else seed)
    if method == "pvp":
        return pvp_items(world, n, PVP_SEED if seed is None else seed)
    if method == "vti":
        return vti_items(world, n, VTI_SEED if seed is None else seed)
    if method == "erasure":
        return erasure_items(world, n, ERASURE_SEED if seed is None else seed)
    raise ValueError(f"the organism has no default fit data for method {method!r}")


def fit_data_for(model: Any, method: str, **options: Any) -> list[Any] | None:
    """Data-source hook (:mod:`haltrace.data.sources`): the default fit items when ``model`` is an organism."""
    from haltrace.organism.paths import organism_world

    world = options.pop("world", None) or organism_world(model)
    if world is None:
        return None
    return fit_items(world, method, **options)
