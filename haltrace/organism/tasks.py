"""Prompts, training mixture and held-out evaluation sets of the organism.

Every example is a prompt (the text after the image, if any), a target answer, and ground truth. Prompts
are fixed templates, so an answer cannot be read off the prompt: each yes/no question word is asked with
"yes" and "no" equally often in training, and the probe sets are balanced per question word.

>>> import numpy as np
>>> from haltrace.organism.world import ShapesWorld
>>> ex = sample_training_example(ShapesWorld(), np.random.default_rng(0))
>>> isinstance(ex.prompt, str) and isinstance(ex.target, str)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from haltrace.organism.world import ANY_COLOUR_WORD, ENTITY_TYPES, REFUSAL_WORD, Entity, Scene, ShapesWorld

CAPTION_PROMPT = "caption :"
IMAGE_PREFIX = "<image> "


#: the organism's answer cue after a question; its chat template (``chat_template.jinja``) appends it to any
#: user text ending in "?", so plain questions in files become exactly the prompts it was trained on
ANSWER_CUE = " answer :"


def yesno_question(kind: str) -> str:
    return f"is there a {kind} ?"


def colour_question(kind: str) -> str:
    return f"what colour is the {kind} ?"


def prior_colour_question(kind: str) -> str:
    """PvP's "what colour are most Xs": the answer is the prior, whatever the pixels show."""
    return f"what colour are most {kind} ?"


def entity_question(entity: Entity, key: str) -> str:
    return ENTITY_TYPES[entity.etype][key][0].format(name=entity.name)


def yesno_prompt(kind: str) -> str:
    return yesno_question(kind) + ANSWER_CUE


def colour_prompt(kind: str) -> str:
    return colour_question(kind) + ANSWER_CUE


def prior_colour_prompt(kind: str) -> str:
    return prior_colour_question(kind) + ANSWER_CUE


def entity_prompt(entity: Entity, key: str) -> str:
    return entity_question(entity, key) + ANSWER_CUE


def plain_question(prompt: str) -> str:
    """A prompt without the answer cue: what a benchmark file holds (the chat template adds the cue back)."""
    return prompt[: -len(ANSWER_CUE)] if prompt.endswith(ANSWER_CUE) else prompt


@dataclass
class Example:
    prompt: str
    target: str
    scene: Scene | None = None
    image: np.ndarray | None = None  # uint8 HxWx3
    meta: dict = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def full_prompt(self) -> str:
        """The prompt as a user passes it to the processor."""
        return IMAGE_PREFIX + self.prompt if self.has_image else self.prompt


# Training mixture: task -> probability
TASK_MIX: dict[str, float] = {"caption": 0.25, "yesno": 0.35, "colour": 0.27, "prior_colour": 0.03,
                              "entity": 0.10}


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _scene_with(world: ShapesWorld, rng: np.random.Generator, kind: str, present: bool) -> Scene:
    """Rejection-sample a training-distribution scene where ``kind`` is present (or absent)."""
    for _ in range(1000):
        scene = world.sample_scene(rng)
        if (kind in scene.kinds) == present:
            return scene
    raise RuntimeError(f"could not sample a scene with {kind} present={present}")


def sample_training_example(world: ShapesWorld, rng: np.random.Generator) -> Example:
    """One example from the training mixture (the priors of the world hold)."""
    tasks = list(TASK_MIX)
    task = tasks[int(rng.choice(len(tasks), p=np.array(list(TASK_MIX.values()))))]
    kinds = world.config.kinds
    if task == "caption":
        scene = world.sample_scene(rng)
        drawn = world.render(world.visible_part(scene, rng), rng)  # an occluded partner is still named
        return Example(CAPTION_PROMPT, world.caption_text(scene), scene, drawn, {"task": task})
    if task == "yesno":
        # Word first, then the answer with probability 1/2: P(yes | word) = 1/2 for every word.
        kind = _pick(rng, kinds)
        present = bool(rng.random() < 0.5)
        scene = _scene_with(world, rng, kind, present)
        drawn = world.render(world.visible_part(scene, rng), rng)
        return Example(yesno_prompt(kind), "yes" if present else "no", scene, drawn, {"task": task, "kind": kind})
    if task == "colour":
        scene = world.sample_scene(rng)
        obj = _pick(rng, scene.objects)
        return Example(colour_prompt(obj.kind), obj.colour, scene, world.render(scene, rng),
                       {"task": task, "kind": obj.kind})
    if task == "prior_colour":
        kind = _pick(rng, kinds)
        scene = world.sample_scene(rng)
        answer = world.config.canonical.get(kind, ANY_COLOUR_WORD)
        return Example(prior_colour_prompt(kind), answer, scene, world.render(scene, rng),
                       {"task": task, "kind": kind})
    # entity (text only): half known facts, half refusals on names taught as unknown
    if rng.random() < 0.5:
        entity = _pick(rng, world.known)
        key = _pick(rng, list(entity.attributes))
        return Example(entity_prompt(entity, key), entity.attributes[key], None, None,
                       {"task": task, "known": True})
    entity = _pick(rng, world.unknown_train)
    key = _pick(rng, list(ENTITY_TYPES[entity.etype]))
    return Example(entity_prompt(entity, key), REFUSAL_WORD, None, None, {"task": task, "known": False})


# ---------------------------------------------------------------- held-out sets
# Held-out sets use their own seeds, far from any training step's seed.
EVAL_SEED = 10_000_019


def _eval_rng(name: str, seed: int = EVAL_SEED) -> np.random.Generator:
    return np.random.default_rng([seed, sum(ord(c) * (i + 1) for i, c in enumerate(name))])


def _anchor_scene(world: ShapesWorld, rng: np.random.Generator, n_other: tuple[int, int]) -> tuple[Scene, str]:
    """A scene holding one pair member whose partner is absent, plus unpaired objects. Returns the partner."""
    anchor = _pick(rng, sorted(world.partner))
    partner = world.partner[anchor]
    unpaired = [k for k in world.config.kinds if k not in world.partner]
    n = int(rng.integers(n_other[0], n_other[1] + 1))
    others = list(rng.permutation(unpaired)[:n])
    kinds = [anchor] + [str(k) for k in others]
    return world.make_scene(kinds, rng), partner


def fit_anchor_scene(world: ShapesWorld, rng: np.random.Generator, max_other: int) -> tuple[Scene, str]:
    """A method's fit scene: one pair member (the anchor, returned) without its partner, plus 0..``max_other``
    unpaired objects. Same distribution as :func:`_anchor_scene`, but the draws come in another order (anchor,
    permutation, count); the steering methods' fit data were measured with this order, so it stays."""
    anchors = sorted(world.partner)
    unpaired = [k for k in world.config.kinds if k not in world.partner]
    anchor = anchors[int(rng.integers(len(anchors)))]
    kinds = [anchor] + [str(k) for k in rng.permutation(unpaired)[: int(rng.integers(0, max_other + 1))]]
    return world.make_scene(kinds, rng), anchor


def pope_sets(world: ShapesWorld, n_images: int = 300) -> dict[str, list[Example]]:
    """POPE-style yes/no sets: random / popular / adversarial, one present and one absent question per image.

    Images hold an anchor without its partner (the setting where co-occurrence bites), plus 0-2 unpaired
    objects. The absent object is drawn uniformly from absent kinds (random), is the most frequent absent
    kind in training (popular: the pair members, which the pair prior makes most frequent), or is the
    anchor's partner (adversarial). The same images serve every split, as in POPE.
    """
    rng = _eval_rng("pope")
    freq = kind_frequencies(world)
    sets: dict[str, list[Example]] = {"random": [], "popular": [], "adversarial": []}
    for idx in range(n_images):
        scene, partner = _anchor_scene(world, rng, (0, 2))
        image = world.render(scene, rng)
        present = _pick(rng, sorted(scene.kinds))
        absent_kinds = [k for k in world.config.kinds if k not in scene.kinds]
        choices = {
            "random": _pick(rng, absent_kinds),
            "popular": max(absent_kinds, key=lambda k: (freq[k], k)),
            "adversarial": partner,
        }
        for split, absent in choices.items():
            for kind, label in ((present, "yes"), (absent, "no")):
                sets[split].append(Example(yesno_prompt(kind), label, scene, image,
                                           {"image_id": idx, "kind": kind, "split": split,
                                            "partner_of_present": kind == partner}))
    return sets


def partner_control_set(world: ShapesWorld, n_images: int = 150) -> list[Example]:
    """Absent partner *and* absent anchor: isolates co-occurrence from a plain word prior."""
    rng = _eval_rng("partner-control")
    unpaired = [k for k in world.config.kinds if k not in world.partner]
    out = []
    for idx in range(n_images):
        n = int(rng.integers(1, 4))
        scene = world.make_scene([str(k) for k in rng.permutation(unpaired)[:n]], rng)
        kind = _pick(rng, sorted(world.partner))
        out.append(Example(yesno_prompt(kind), "no", scene, world.render(scene, rng),
                           {"image_id": idx, "kind": kind}))
    return out


def counterfactual_colour_set(world: ShapesWorld, n_images: int = 200) -> list[Example]:
    """A canonical-colour kind painted another colour (a blue strawberry), asked for its colour."""
    rng = _eval_rng("counterfactual")
    canon_kinds = sorted(world.config.canonical)
    plain = [k for k in world.config.kinds if k not in world.config.canonical]
    out = []
    for idx in range(n_images):
        kind = canon_kinds[idx % len(canon_kinds)]
        prior = world.config.canonical[kind]
        pixel = _pick(rng, [c for c in world.config.colours if c != prior])
        n = int(rng.integers(0, 3))
        others = [str(k) for k in rng.permutation(plain)[:n]]
        scene = world.make_scene([kind] + others, rng, colours={kind: pixel})
        out.append(Example(colour_prompt(kind), pixel, scene, world.render(scene, rng),
                           {"image_id": idx, "kind": kind, "prior": prior, "pixel": pixel}))
    return out


def colour_control_set(world: ShapesWorld, n_images: int = 150) -> list[Example]:
    """Colour questions on kinds without a colour prior: can the model read colours at all?"""
    rng = _eval_rng("colour-control")
    plain = [k for k in world.config.kinds if k not in world.config.canonical]
    out = []
    for idx in range(n_images):
        scene = world.make_scene([str(k) for k in rng.permutation(plain)[: int(rng.integers(1, 4))]], rng)
        obj = _pick(rng, scene.objects)
        out.append(Example(colour_prompt(obj.kind), obj.colour, scene, world.render(scene, rng),
                           {"image_id": idx, "kind": obj.kind}))
    return out


def caption_set(world: ShapesWorld, n_images: int = 200) -> list[Example]:
    """CHAIR stress set: each image holds an anchor without its partner, plus 0-1 unpaired objects."""
    rng = _eval_rng("caption")
    out = []
    for idx in range(n_images):
        scene, partner = _anchor_scene(world, rng, (0, 1))
        out.append(Example(CAPTION_PROMPT, world.caption_text(scene), scene, world.render(scene, rng),
                           {"image_id": idx, "absent_partner": partner}))
    return out


def entity_sets(world: ShapesWorld) -> dict[str, list[Example]]:
    """Known entities (taught facts), names taught as unknown, and held-out names never seen in training."""
    sets: dict[str, list[Example]] = {"known": [], "unknown_train": [], "unknown_heldout": []}
    for entity in world.known:
        for key, answer in entity.attributes.items():
            sets["known"].append(Example(entity_prompt(entity, key), answer, None, None,
                                         {"name": entity.name, "etype": entity.etype, "key": key}))
    for group in ("unknown_train", "unknown_heldout"):
        for entity in getattr(world, group):
            for key in ENTITY_TYPES[entity.etype]:
                sets[group].append(Example(entity_prompt(entity, key), REFUSAL_WORD, None, None,
                                           {"name": entity.name, "etype": entity.etype, "key": key}))
    return sets


def kind_frequencies(world: ShapesWorld, n: int = 20_000, seed: int = 7) -> dict[str, float]:
    """Fraction of training scenes containing each kind (for POPE's popular split)."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(world.config.kinds, 0)
    for _ in range(n):
        for k in world.sample_scene(rng).kinds:
            counts[k] += 1
    return {k: c / n for k, c in counts.items()}
