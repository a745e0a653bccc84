"""Typed items that methods fit on and evaluations run on, one dataclass per kind.

Every item holds a *plain* question or caption (no prompt template, no image placeholder): the model's chat
template (or a ``--prompt-template``) turns it into a prompt, so the same file serves LLaVA, Qwen2-VL and the
organism. ``image`` is a path (resolved by :mod:`haltrace.data.jsonl` against ``--images``), a PIL image or an
``HxWx3`` uint8 array; :func:`haltrace.data.images.open_image` opens any of them.

The JSONL schema of every kind is written down once, in ``docs/data-formats.md``.

>>> q = YesNoQuestion(question="is there a knife ?", label="yes", image="img/0001.png")
>>> q.kind, q.present
('yesno', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class YesNoQuestion:
    """A yes/no question about an image (POPE), with its ground-truth ``label`` ("yes"/"no").

    ``object`` is the object asked about, ``category`` a free tag (POPE split, or "partner" for an absent
    co-occurring object), ``image_id`` groups questions about one image (fit/held-out splits keep them together).
    """

    question: str
    label: str
    image: Any = None
    question_id: Any = None
    image_id: Any = None
    object: str | None = None
    category: str | None = None
    kind: ClassVar[str] = "yesno"

    @property
    def present(self) -> bool:
        return self.label == "yes"


@dataclass
class VQAQuestion:
    """A question with one short reference ``answer`` (e.g. "what colour is the cup ?" -> "blue")."""

    question: str
    answer: str
    image: Any = None
    question_id: Any = None
    image_id: Any = None
    kind: ClassVar[str] = "vqa"


@dataclass
class CaptionItem:
    """An image with its ground-truth ``objects`` (CHAIR), and optionally the caption prompt to ask."""

    image: Any
    objects: list[str] = field(default_factory=list)
    image_id: Any = None
    prompt: str | None = None
    kind: ClassVar[str] = "caption"


@dataclass
class CaptionPair:
    """A truthful and a hallucinated caption of one image (VTI's contrast)."""

    image: Any
    truthful: str
    hallucinated: str
    image_id: Any = None
    prompt: str | None = None
    kind: ClassVar[str] = "caption_pair"


@dataclass
class PvPItem:
    """A counterfactual image asked two ways (Pixels vs Priors): ``this_question`` ("what colour is this X ?",
    answered from the pixels) and ``most_question`` ("what colour are most X ?", answered from the prior);
    ``prior``/``pixel`` are the two answers when known."""

    image: Any
    this_question: str
    most_question: str
    prior: str | None = None
    pixel: str | None = None
    image_id: Any = None
    attribute: str | None = None
    kind: ClassVar[str] = "pvp"


@dataclass
class EntityQuestion:
    """A text question about a named entity the model knows (``known=True``) or does not."""

    question: str
    known: bool
    answer: str | None = None
    entity: str | None = None
    question_id: Any = None
    kind: ClassVar[str] = "entity"


@dataclass
class Statement:
    """A true/false statement (``label=True`` = true), text only."""

    statement: str
    label: bool
    statement_id: Any = None
    kind: ClassVar[str] = "statement"


Item = YesNoQuestion | VQAQuestion | CaptionItem | CaptionPair | PvPItem | EntityQuestion | Statement

#: kind name -> item class
KINDS: dict[str, type] = {cls.kind: cls for cls in (YesNoQuestion, VQAQuestion, CaptionItem, CaptionPair,
                                                     PvPItem, EntityQuestion, Statement)}


def of_kind(items: Any, *kinds: type, method: str = "") -> list:
    """The items of the given classes, in order; a clear error when ``items`` holds none of them.

    >>> of_kind([Statement("a is b", True)], Statement)[0].label
    True
    """
    items = list(items or [])
    picked = [it for it in items if isinstance(it, kinds)]
    if not picked:
        found = sorted({getattr(it, "kind", type(it).__name__) for it in items}) or ["nothing"]
        want = ", ".join(k.kind for k in kinds)
        who = f"{method} " if method else ""
        raise ValueError(f"{who}fit data must hold {want} items (see docs/data-formats.md); got {', '.join(found)}")
    return picked
