"""CHAIR caption parsing: ``rules="official"`` (``LisaAnne/Hallucination`` ``utils/chair.py``) and ``"simple"``.

``"official"`` follows ``CHAIR.caption_to_words`` (commit a967f2f) step by step:

1. lower-case, then NLTK's ``word_tokenize`` (see :func:`tokenize` for the no-download path);
2. singularise every token like ``pattern.en.singularize`` (:func:`singularize`, a small rule set, no
   dependency: ``inflect.singular_noun`` was tried and disagrees on ``ties``, ``canoes``, ``doggies``,
   ``collies`` and ``glass``);
3. merge two-token phrases left to right through the official double-word table (:data:`OFFICIAL_DOUBLE_WORDS`:
   COCO compounds, "baby/adult X" -> X for animals, "passenger jet/train" -> jet/train, "bow tie" -> tie,
   "toilet seat" -> toilet, "wine glas" -> wine glass, "train track" kept whole so it is not a train);
4. if "toilet" and "seat" both remain, drop every "seat" (a toilet seat is not a chair);
5. keep tokens that are synonym-table entries and map them to their line's first entry; repeats are kept.

Quirks kept on purpose, because published CHAIR numbers include them: "bus" -> "bu" and "ties" -> "ty" (never
counted, while "buses" is), "canoes" -> "cano", "doggies"/"collies" stay plural; the table is split with
``line.strip().split(', ')``, so "scooter,  motor bike" yields " motor bike" and "motor bike" is never counted,
" cheesecake" likewise, and "iPhone" never matches a lower-cased caption.

``"simple"`` is :func:`haltrace.data.chair.caption_objects` (punctuation split, no singularisation), the
organism's rule set: its vocabulary is plain single words (fork, knife, cup, plate, ball, banana, ...).

>>> table = read_synonym_table()                     # the packaged official COCO table
>>> parse_caption("Two men and a baby elephant on a bus.", table)   # "bus" -> "bu": not counted
['person', 'elephant']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from haltrace.data.chair import caption_objects as simple_caption_objects
from haltrace.data.chair import chair_metrics, default_phrases, score_mentions

RULES = ("official", "simple")
COCO_SYNONYMS = Path(__file__).resolve().parent / "tables" / "coco_synonyms.txt"


def check_rules(rules: str) -> str:
    """``rules`` if it names a rule set, else a ValueError listing them."""
    if rules not in RULES:
        raise ValueError(f"unknown CHAIR rules {rules!r}; choose one of {list(RULES)}")
    return rules


# ------------------------------------------------------------------------------------------ singularise
# pattern.en returns a token unchanged when some word of its uninflected/uncountable lists ENDS WITH it; these
# are the table words among them (this rule set was checked against pattern's own function on its 80k-word
# lexicon plus the plurals of every table word: no difference where either result is an entry or bigram half)
_KEEP_IF_SUFFIX_OF = ("scissors", "luggage", "bison")
# pattern.en returns plurals of its "-ie" list *unchanged* (the word, not the word minus "s"); table words only
_IE_PLURALS_KEPT = ("doggies", "collies")
# irregular plurals, matched as word endings ("policemen" -> "policeman")
_IRREGULAR = (("children", "child"), ("people", "person"), ("geese", "goose"), ("oxen", "ox"),
              ("teeth", "tooth"), ("feet", "foot"), ("kine", "cow"), ("leaves", "leaf"), ("men", "man"))
# ordered suffix rules; the first that matches wins, as in pattern.en
_SUFFIX_RULES = tuple((re.compile(p), r) for p, r in (
    (r"^(ox)en", r"\1"),                    # not anchored at the end in pattern either: oxens -> oxs
    (r"(shoe)s$", r"\1"),
    (r"(o)es$", r"\1"),                     # potatoes -> potato, and canoes -> cano
    (r"(bus)es$", r"\1"),
    (r"([ml])ice$", r"\1ouse"),             # mice -> mouse
    (r"(x|ch|ss|sh)es$", r"\1"),            # benches, glasses
    (r"([^aeiouy]|qu)ies$", r"\1y"),        # puppies -> puppy, and ties -> ty
    (r"([aeo]l)ves$", r"\1f"),              # calves -> calf
    (r"([^d]ea)ves$", r"\1f"),
    (r"([nlw]i)ves$", r"\1fe"),             # knives -> knife
    (r"([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),              # stoves, gloves
    (r"([st]ive|hive)s$", r"\1"),           # locomotives
    (r"([^f])ves$", r"\1fe"),
    (r"([ti])a$", r"\1um"),
    (r"s$", ""),                            # bus -> bu and glass -> glas too (hence "wine glas")
))


@lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """``pattern.en.singularize`` on the words that matter for CHAIR, quirks included.

    A rule set of our own, not the library (pattern is unmaintained and its install builds mysqlclient): it
    agrees with pattern.en 3.6 wherever either result is a synonym-table entry or half of a double word.

    >>> [singularize(w) for w in ("dogs", "women", "people", "knives", "glasses", "glass", "bus", "ties")]
    ['dog', 'woman', 'person', 'knife', 'glass', 'glas', 'bu', 'ty']
    """
    if any(kept.endswith(word) for kept in _KEEP_IF_SUFFIX_OF) or word.endswith(_IE_PLURALS_KEPT):
        return word
    for plural, single in _IRREGULAR:
        if word.endswith(plural):
            return word[: len(word) - len(plural)] + single
    for pattern, replacement in _SUFFIX_RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word, count=1)
    return word


# --------------------------------------------------------------------------------------------- tokenise
@lru_cache(maxsize=1)
def _tokenizer() -> tuple[str, Callable[[str], list[str]]]:
    import nltk

    try:
        nltk.word_tokenize("a dog.")
        return "nltk.word_tokenize", nltk.word_tokenize
    except LookupError:
        pass
    # punkt/punkt_tab is not installed and cannot be downloaded here. word_tokenize = Punkt sentence split +
    # NLTKWordTokenizer per sentence; the sentence split matters (without it "a dog. a cat" keeps "dog."),
    # so use an untrained Punkt, which needs no data and differs from the trained one only on abbreviations.
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
    return ("punkt(untrained)+NLTKWordTokenizer",
            lambda text: [w for sent in sentences.tokenize(text) for w in words.tokenize(sent)])


def tokenize(text: str) -> list[str]:
    """NLTK word tokens of ``text`` (``nltk.word_tokenize`` when its data is installed).

    >>> tokenize("a dog. two cats, a hot-dog!")
    ['a', 'dog', '.', 'two', 'cats', ',', 'a', 'hot-dog', '!']
    """
    return _tokenizer()[1](text)


def tokenizer_name() -> str:
    """Which tokenizer :func:`tokenize` uses here (recorded next to scores)."""
    return _tokenizer()[0]


# ------------------------------------------------------------------------------------------- synonyms
@dataclass(frozen=True)
class SynonymTable:
    """A CHAIR synonym table: ``words`` (every entry), ``inverse`` (entry -> canonical), ``canonical``."""

    words: frozenset[str]
    inverse: Mapping[str, str]
    canonical: tuple[str, ...]
    source: str


def read_synonym_table(path: str | Path | None = None, rules: str = "official") -> SynonymTable:
    """Read a ``synonyms.txt`` (default: the packaged official COCO table).

    ``"official"`` splits each line exactly as ``chair.py`` does (``line.strip().split(', ')``; later lines win
    for a repeated entry); ``"simple"`` strips and lower-cases entries, first line wins, as
    :func:`haltrace.evals.formats.read_synonyms`. Blank lines are skipped in both.

    >>> read_synonym_table().inverse["puppy"]
    'dog'
    """
    check_rules(rules)
    path = Path(path) if path is not None else COCO_SYNONYMS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected CHAIR's synonyms.txt (one class per line, "
                                "', '-separated, canonical name first)")
    words: set[str] = set()
    inverse: dict[str, str] = {}
    canonical: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if rules == "official":
            entries = line.strip().split(", ")
        else:
            entries = [w.strip().lower() for w in line.split(",") if w.strip()]
        canonical.append(entries[0])
        words.update(entries)
        for entry in entries:
            if rules == "official":
                inverse[entry] = entries[0]
            else:
                inverse.setdefault(entry, entries[0])
    if not canonical:
        raise ValueError(f"{path} holds no synonym lines")
    source = "coco (LisaAnne/Hallucination data/synonyms.txt)" if path == COCO_SYNONYMS else str(path)
    return SynonymTable(frozenset(words), inverse, tuple(dict.fromkeys(canonical)), source)


def identity_table(names: Iterable[str], source: str = "category names") -> SynonymTable:
    """Each name is its own canonical word (no synonyms): the vocabulary of non-COCO category sets.

    >>> identity_table(["fork", "knife"]).inverse
    {'fork': 'fork', 'knife': 'knife'}
    """
    names = tuple(dict.fromkeys(names))
    return SynonymTable(frozenset(names), {n: n for n in names}, names, source)


# ------------------------------------------------------------------------------------- double words
_COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track")
# "baby dog" is not a person: qualifiers before these animals / vehicles reduce to the noun
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
            "cub")
_VEHICLES = ("jet", "train")


def _official_double_words() -> dict[str, str]:
    table = {w: w for w in _COCO_DOUBLE_WORDS}
    table.update({f"{q} {a}": a for a in _ANIMALS for q in ("baby", "adult")})
    table.update({f"passenger {v}": v for v in _VEHICLES})
    # assigned after the compounds, so these win, as in chair.py
    table.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return table


#: the official bigram table: bigram (after singularising) -> the token it becomes
OFFICIAL_DOUBLE_WORDS: Mapping[str, str] = _official_double_words()


def double_words(table: SynonymTable) -> dict[str, str]:
    """The official bigram table plus the table's own two-word entries that it lacks.

    The additions let a custom vocabulary's two-word names match at all; for the COCO table the only one is
    "dining table", whose "table" maps to the same class anyway, so COCO results are unchanged.
    """
    out = dict(OFFICIAL_DOUBLE_WORDS)
    for word in table.words:
        # entries with a stray space (" motor bike") never match in chair.py, so they are not added either
        if word == word.strip() and len(word.split(" ")) == 2 and word not in out:
            out[word] = word
    return out


def phrases_for(table: SynonymTable, rules: str) -> dict[str, str]:
    """The bigram table each rule set merges with: :func:`double_words` or the simple rules' two-word entries."""
    if check_rules(rules) == "official":
        return double_words(table)
    return default_phrases(table.inverse)


def _merge(tokens: Sequence[str], phrases: Mapping[str, str]) -> list[str]:
    # greedy left to right: a merged pair is consumed whole, as chair.py does
    out, i = [], 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if i + 1 < len(tokens) and pair in phrases:
            out.append(phrases[pair])
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def official_caption_words(caption: str, table: SynonymTable,
                           phrases: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """``(words, canonical)`` as ``chair.py``'s ``caption_to_words``: the table entries found, and their classes.

    >>> official_caption_words("A toilet seat next to a wooden seat.", read_synonym_table())
    (['toilet'], ['toilet'])
    """
    tokens = [singularize(t) for t in tokenize(caption.lower())]
    tokens = _merge(tokens, double_words(table) if phrases is None else phrases)
    if "toilet" in tokens and "seat" in tokens:
        tokens = [t for t in tokens if t != "seat"]
    words = [t for t in tokens if t in table.words]
    return words, [table.inverse[w] for w in words]


def parse_caption(caption: str, table: SynonymTable, rules: str = "official",
                  phrases: Mapping[str, str] | None = None) -> list[str]:
    """Canonical objects mentioned in ``caption`` under ``rules``, in order, repeats kept.

    >>> parse_caption("Two wine glasses and a cell phone", read_synonym_table())
    ['wine glass', 'cell phone']
    """
    if check_rules(rules) == "official":
        return official_caption_words(caption, table, phrases)[1]
    return simple_caption_objects(caption, table.canonical, table.inverse,
                                  default_phrases(table.inverse) if phrases is None else phrases)


def chair_scores(captions: Sequence[str], truths: Sequence[Iterable[str]], table: SynonymTable,
                 rules: str = "official", phrases: Mapping[str, str] | None = None) -> dict:
    """CHAIR_s, CHAIR_i, recall, mean length, counts and hallucinated words, under ``rules``.

    Same keys as :func:`haltrace.data.chair.chair_metrics` (``"simple"`` is exactly that function). Truth
    objects are mapped through the table too, so a truth list may name synonyms.

    >>> chair_scores(["Two dogs and a cat."], [{"dog"}], read_synonym_table())["chair_i"]
    0.5
    """
    if check_rules(rules) == "simple":
        return chair_metrics(captions, truths, vocabulary=table.canonical, synonyms=table.inverse,
                             phrases=default_phrases(table.inverse) if phrases is None else phrases)
    phrases = double_words(table) if phrases is None else phrases
    return score_mentions(captions, truths, lambda c: official_caption_words(c, table, phrases)[1],
                          lambda t: table.inverse.get(t, t))
