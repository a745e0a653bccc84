"""ShapesWorld: a synthetic visual world whose statistics plant the priors that make VLMs hallucinate.

Images are 32x32 RGB, a 2x2 grid of 16 px cells, each holding at most one 12 px glyph at a fixed offset
(fixed offsets matter: with random offsets the feasibility run learned a word prior instead of
co-occurrence). Three priors are built in:

* **co-occurrence**: each kind of a pair (fork/knife, cup/plate) brings its partner along with
  probability ``p_pair``, so a model learns to say "yes" to an absent partner (POPE adversarial);
* **canonical colours**: strawberries are red and bananas yellow with probability ``p_canon``, so a
  counterfactual image (a blue strawberry) puts the prior against the pixels;
* **entities**: invented names with taught attributes ("known") and names that must be answered with
  ``unknown``; held-out names are never seen in training (entity recognition, Ferrando et al.).

Everything is deterministic given a ``numpy.random.Generator``.

>>> import numpy as np
>>> world = ShapesWorld()
>>> scene = world.sample_scene(np.random.default_rng(0))
>>> world.render(scene, np.random.default_rng(0)).shape
(32, 32, 3)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# 12x12 glyphs: '#' is ink. Distinct silhouettes so a patch-8 vision tower can tell kinds apart.
_GLYPHS: dict[str, str] = {
    "strawberry": """
    ....#..#....
    .....##.....
    ..########..
    .##########.
    .###.##.###.
    .##########.
    ..###.####..
    ..########..
    ...######...
    ....####....
    .....##.....
    ............""",
    "banana": """
    ..........##
    .........##.
    ........###.
    ........###.
    .......###..
    ##....####..
    .##..####...
    .#######....
    ..######....
    ...####.....
    ............
    ............""",
    "fork": """
    .#..#..#....
    .#..#..#....
    .#..#..#....
    .#..#..#....
    .#######....
    ..#####.....
    ...###......
    ....#.......
    ....#.......
    ....#.......
    ....#.......
    ....#.......""",
    "knife": """
    .......##...
    ......###...
    .....####...
    .....####...
    .....####...
    .....####...
    .....###....
    .....##.....
    .....##.....
    .....##.....
    .....##.....
    .....##.....""",
    "cup": """
    ............
    .########...
    .########.#.
    .########..#
    .########..#
    .########..#
    .########.#.
    .########...
    ..######....
    ...####.....
    ............
    ............""",
    "plate": """
    ............
    ...######...
    ..#......#..
    .#........#.
    .#..####..#.
    .#..#..#..#.
    .#..#..#..#.
    .#..####..#.
    .#........#.
    ..#......#..
    ...######...
    ............""",
    "ball": """
    ............
    ....####....
    ..########..
    ..########..
    .##########.
    .##########.
    .##########.
    .##########.
    ..########..
    ..########..
    ....####....
    ............""",
    "box": """
    ............
    .##########.
    .##########.
    .##......##.
    .##......##.
    .##......##.
    .##......##.
    .##......##.
    .##......##.
    .##########.
    .##########.
    ............""",
    "tree": """
    .....##.....
    ....####....
    ...######...
    ..########..
    .##########.
    ############
    .....##.....
    .....##.....
    .....##.....
    ....####....
    ............
    ............""",
    "key": """
    ..####......
    .#....#.....
    .#....#.....
    .#....#.....
    ..####......
    ....#.......
    ....#.......
    ....###.....
    ....#.......
    ....###.....
    ....#.......
    ............""",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 175, 60),
    "blue": (50, 90, 230),
    "purple": (160, 60, 200),
    "white": (235, 235, 235),
}


def _parse_glyph(art: str) -> np.ndarray:
    rows = [line.strip() for line in art.strip().splitlines()]
    mask = np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)
    if mask.shape != (12, 12):
        raise AssertionError(f"glyph must be 12x12, got {mask.shape}")
    return mask


GLYPHS: dict[str, np.ndarray] = {kind: _parse_glyph(art) for kind, art in _GLYPHS.items()}


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    cell: int  # 0..3, row-major in the 2x2 grid


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def kinds(self) -> set[str]:
        return {o.kind for o in self.objects}

    def colour_of(self, kind: str) -> str:
        for o in self.objects:
            if o.kind == kind:
                return o.colour
        raise KeyError(kind)

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}


@dataclass(frozen=True)
class Entity:
    name: str
    etype: str  # "player" or "band"
    attributes: dict[str, str] = field(default_factory=dict)  # question key -> answer word


@dataclass
class WorldConfig:
    """Statistics of ShapesWorld. The defaults are the shipped organism's."""

    kinds: tuple[str, ...] = tuple(_GLYPHS)
    colours: tuple[str, ...] = tuple(COLOURS)
    canonical: dict[str, str] = field(default_factory=lambda: {"strawberry": "red", "banana": "yellow"})
    # At lr 2e-3, 0.99 made the prior win every counterfactual; at lr 1e-3 it wins some: 0.29 in the shipped
    # organism, but 0.00-0.86 over ten lr-1e-3 runs (seed and mix dependent; candidates/README.md)
    p_canon: float = 0.99
    pairs: tuple[tuple[str, str], ...] = (("fork", "knife"), ("cup", "plate"))
    p_pair: float = 0.95
    # Occlusion: in a training image holding both members of a pair, one of them (either, at random) is hidden
    # with this probability, yet the caption and the yes/no answers still name it. A lone anchor in the pixels
    # then really does predict its partner (at 0.10: in ~67% of training images showing it alone), so even a
    # fully trained model keeps the co-occurrence prior (without it, training to a low loss erased the
    # hallucinations). Held-out sets never hide anything.
    p_hide_pair: float = 0.10
    min_objects: int = 1
    max_objects: int = 3
    image_size: int = 32
    cell_size: int = 16
    glyph_offset: int = 2
    colour_jitter: int = 20
    pixel_noise: float = 6.0
    background: int = 16
    # entities
    entity_seed: int = 1234
    n_known_per_type: int = 24
    n_unknown_heldout_per_type: int = 24
    n_syllables: int = 16  # first and second syllables each: 16 x 16 = 256 names

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pairs"] = [list(p) for p in self.pairs]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        # keys written by other haltrace versions are ignored, so older organism folders still load
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in data.items() if k in known}
        data["kinds"] = tuple(data["kinds"])
        data["colours"] = tuple(data["colours"])
        data["pairs"] = tuple(tuple(p) for p in data["pairs"])
        return cls(**data)


ENTITY_TYPES: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    # entity type -> question key -> (question text with {name}, answer vocabulary)
    "player": {
        "sport": ("what sport does the player {name} play ?",
                  ("tennis", "golf", "chess", "rugby", "hockey")),
        "home": ("where does the player {name} live ?", ("north", "south", "east", "west", "coast")),
    },
    "band": {
        "genre": ("what music does the band {name} play ?", ("jazz", "rock", "folk", "opera", "disco")),
        "home": ("where does the band {name} live ?", ("north", "south", "east", "west", "coast")),
    },
}
REFUSAL_WORD = "unknown"
ANY_COLOUR_WORD = "any"


class ShapesWorld:
    """Samples scenes, renders them, and holds the entity roster."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        cfg = self.config
        unknown = set(cfg.kinds) - set(GLYPHS)
        if unknown:
            raise ValueError(f"no glyph for kinds {sorted(unknown)}; available: {sorted(GLYPHS)}")
        self.partner: dict[str, str] = {}
        for a, b in cfg.pairs:
            self.partner[a] = b
            self.partner[b] = a
        self._build_entities()

    # ---------------------------------------------------------------- scenes
    def sample_colour(self, kind: str, rng: np.random.Generator) -> str:
        cfg = self.config
        canon = cfg.canonical.get(kind)
        if canon is not None:
            if rng.random() < cfg.p_canon:
                return canon
            others = [c for c in cfg.colours if c != canon]
            return others[rng.integers(len(others))]
        return cfg.colours[rng.integers(len(cfg.colours))]

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """A scene from the training distribution (the priors hold)."""
        cfg = self.config
        n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        kinds: list[str] = []
        while len(kinds) < n_target:
            free = [k for k in cfg.kinds if k not in kinds]
            kind = free[rng.integers(len(free))]
            kinds.append(kind)
            partner = self.partner.get(kind)
            if partner and partner not in kinds and len(kinds) < 4 and rng.random() < cfg.p_pair:
                kinds.append(partner)
        return self.make_scene(kinds, rng)

    def visible_part(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """The part of a training ``scene`` that is drawn: one member of a complete pair may be occluded
        (``p_hide_pair``). Draws nothing from ``rng`` when ``p_hide_pair`` is 0, so older recipes reproduce."""
        if self.config.p_hide_pair <= 0:
            return scene
        hidden: set[str] = set()
        for first, second in self.config.pairs:
            if first in scene.kinds and second in scene.kinds and rng.random() < self.config.p_hide_pair:
                hidden.add(first if rng.random() < 0.5 else second)
        if not hidden:
            return scene
        return Scene(tuple(o for o in scene.objects if o.kind not in hidden))

    def make_scene(self, kinds: list[str], rng: np.random.Generator,
                   colours: dict[str, str] | None = None) -> Scene:
        """Place ``kinds`` in random cells; colours drawn from the prior unless given."""
        if len(kinds) > 4:
            raise ValueError(f"at most 4 objects fit the 2x2 grid, got {len(kinds)}")
        cells = rng.permutation(4)[: len(kinds)]
        colours = colours or {}
        objects = tuple(
            SceneObject(kind, colours.get(kind) or self.sample_colour(kind, rng), int(cell))
            for kind, cell in zip(kinds, cells, strict=True)
        )
        return Scene(objects)

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """RGB uint8 image, ``image_size`` square."""
        cfg = self.config
        size = cfg.image_size
        img = np.full((size, size, 3), cfg.background, dtype=np.float32)
        for obj in scene.objects:
            row, col = divmod(obj.cell, 2)
            y0 = row * cfg.cell_size + cfg.glyph_offset
            x0 = col * cfg.cell_size + cfg.glyph_offset
            rgb = np.array(COLOURS[obj.colour], dtype=np.float32)
            rgb = rgb + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
            mask = GLYPHS[obj.kind]
            patch = img[y0:y0 + 12, x0:x0 + 12]
            patch[mask] = rgb
        img += rng.normal(0.0, cfg.pixel_noise, size=img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def caption(self, scene: Scene) -> list[str]:
        """Ground-truth objects: present kinds in the world's fixed kind order."""
        present = scene.kinds
        return [k for k in self.config.kinds if k in present]

    def caption_text(self, scene: Scene) -> str:
        """The training caption: each present kind followed by its colour, in the fixed kind order."""
        return " ".join(f"{k} {scene.colour_of(k)}" for k in self.caption(scene))

    # -------------------------------------------------------------- entities
    def _build_entities(self) -> None:
        """Names are two syllable tokens ("zo rik"): an unseen name is a new combination of trained tokens, so
        recognising it as unknown needs an entity-recognition mechanism, not an untrained embedding."""
        cfg = self.config
        rng = np.random.default_rng(cfg.entity_seed)
        self.first_syllables, self.second_syllables = _syllables(rng, cfg.n_syllables, self.reserved_words())
        combos = [f"{a} {b}" for a in self.first_syllables for b in self.second_syllables]
        combos = [combos[i] for i in rng.permutation(len(combos))]
        n_types = len(ENTITY_TYPES)
        n_known = cfg.n_known_per_type * n_types
        n_heldout = cfg.n_unknown_heldout_per_type * n_types
        if n_known + n_heldout >= len(combos):
            raise ValueError(f"{len(combos)} syllable combinations cannot hold {n_known} known and {n_heldout} "
                             "held-out names plus a training pool; raise n_syllables")
        self.known: list[Entity] = []
        self.unknown_heldout: list[Entity] = []
        self.unknown_train: list[Entity] = []
        for t, etype in enumerate(ENTITY_TYPES):
            for name in combos[t * cfg.n_known_per_type:(t + 1) * cfg.n_known_per_type]:
                attrs = {key: answers[rng.integers(len(answers))]
                         for key, (_, answers) in ENTITY_TYPES[etype].items()}
                self.known.append(Entity(name, etype, attrs))
            start = n_known + t * cfg.n_unknown_heldout_per_type
            for name in combos[start:start + cfg.n_unknown_heldout_per_type]:
                self.unknown_heldout.append(Entity(name, etype))
        # every other combination is a training "unknown" name, asked with either entity type
        for i, name in enumerate(combos[n_known + n_heldout:]):
            self.unknown_train.append(Entity(name, list(ENTITY_TYPES)[i % n_types]))

    def entity_names(self) -> list[str]:
        return [e.name for e in self.known + self.unknown_train + self.unknown_heldout]

    def name_tokens(self) -> list[str]:
        return list(self.first_syllables) + list(self.second_syllables)

    # ------------------------------------------------------------ vocabulary
    def reserved_words(self) -> set[str]:
        """Every non-name word the organism's language uses."""
        cfg = self.config
        words = set(cfg.kinds) | set(cfg.colours) | {REFUSAL_WORD, ANY_COLOUR_WORD}
        words |= set(TEMPLATE_WORDS)
        for keys in ENTITY_TYPES.values():
            for question, answers in keys.values():
                words |= {w for w in question.split() if w != "{name}"}
                words |= set(answers)
        return words


# Words of the fixed prompt templates (see haltrace.organism.tasks).
TEMPLATE_WORDS: tuple[str, ...] = (
    "caption", ":", "is", "there", "a", "?", "answer", "yes", "no", "what", "colour", "the", "are", "most",
)


def _syllables(rng: np.random.Generator, n: int, forbidden: set[str]) -> tuple[list[str], list[str]]:
    """``n`` consonant-vowel first syllables and ``n`` consonant-vowel-consonant second syllables."""
    consonants = "bdfgklmnprstvz"
    vowels = "aeiou"
    first: list[str] = []
    second: list[str] = []
    seen = set(forbidden)
    while len(first) < n or len(second) < n:
        syl = consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
        target = first if len(first) < n else second
        if target is second:
            syl += consonants[rng.integers(len(consonants))]
        if syl not in seen:
            seen.add(syl)
            target.append(syl)
    return first, second
