"""CHAIR (Rohrbach et al. 2018): object hallucination in captions.

It sits in the data layer (with :mod:`haltrace.data.chair_rules`, the official parsing) because methods label
their fit data with the same rules the benchmark scores with: TruthPrInt marks each caption object word real or
hallucinated exactly as CHAIR would. The evaluations (:mod:`haltrace.evals`) import it from here.

CHAIR_i = hallucinated object mentions / all object mentions (repeats counted, as the original does);
CHAIR_s = captions with at least one hallucinated object / captions. A mention is hallucinated when its
canonical word (through ``synonyms``) is not in the image's ground-truth set. Also reports recall
(|mentioned ∩ truth| / |truth|) and mean caption length in words, because CHAIR depends on length.

>>> chair_metrics(["fork knife", "cup"], [{"fork"}, {"cup"}], vocabulary={"fork", "knife", "cup"})["chair_i"]
0.3333333333333333

Synonyms come from the original's ``data/synonyms.txt`` format (:func:`haltrace.evals.formats.read_synonyms`).
Two-word names ("hot dog", "dining table") are merged into one token first via ``phrases`` (the original's
``double_word_dict``); singularisation (the original's ``pattern.en.singularize``) is not applied, so
plural mentions count only where the synonym table lists the plural.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence


def default_phrases(synonyms: Mapping[str, str] | None) -> dict[str, str]:
    """Two-word synonym entries ("dining table" -> "dining table") as a phrase table for merging.

    >>> default_phrases({"hot dog": "hot dog", "dog": "dog"})
    {'hot dog': 'hot dog'}
    """
    return {w: w for w in (synonyms or {}) if len(w.split()) == 2}


def _merge_phrases(words: list[str], phrases: Mapping[str, str]) -> list[str]:
    # greedy left-to-right, as the original merges bigrams before looking words up
    out, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if i + 1 < len(words) and pair in phrases:
            out.append(phrases[pair])
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def caption_objects(caption: str, vocabulary: Iterable[str],
                    synonyms: Mapping[str, str] | None = None,
                    phrases: Mapping[str, str] | None = None) -> list[str]:
    """Canonical object words mentioned in a caption, in order, repeats kept.

    Lower-cases, strips punctuation, merges two-word ``phrases`` (bigram -> token, e.g. "hot dog"), maps each
    word through ``synonyms`` (word -> canonical), keeps words in ``vocabulary``.

    >>> caption_objects("A hot dog and a puppy.", {"hot dog", "dog"}, {"puppy": "dog"}, {"hot dog": "hot dog"})
    ['hot dog', 'dog']
    """
    vocab = set(vocabulary)
    synonyms = synonyms or {}
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in caption.lower()).split()
    if phrases:
        words = _merge_phrases(words, phrases)
    found = []
    for word in words:
        canonical = synonyms.get(word, word)
        if canonical in vocab:
            found.append(canonical)
    return found


def chair_metrics(captions: Sequence[str], truths: Sequence[Iterable[str]], *, vocabulary: Iterable[str],
                  synonyms: Mapping[str, str] | None = None,
                  phrases: Mapping[str, str] | None = None) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, recall, mean length, and the hallucinated words with their counts.

    Ground-truth objects are mapped through ``synonyms`` too, so "puppy" in a truth list means "dog".
    """
    vocab = set(vocabulary)
    return score_mentions(captions, truths, lambda c: caption_objects(c, vocab, synonyms, phrases),
                          lambda t: (synonyms or {}).get(t, t))


def score_mentions(captions: Sequence[str], truths: Sequence[Iterable[str]], parse: Callable[[str], list[str]],
                   canonical: Callable[[str], str]) -> dict:
    """The CHAIR tally shared by every rule set: ``parse`` turns a caption into canonical object mentions
    (repeats kept), ``canonical`` maps a ground-truth object onto the same vocabulary."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} ground-truth sets")
    if not captions:
        raise ValueError("no captions to score")
    mentions = hallucinated = with_hallucination = covered = truth_total = words = 0
    hallucinated_words: dict[str, int] = {}
    for caption, truth in zip(captions, truths, strict=True):
        truth = {canonical(t) for t in truth}
        objects = parse(caption)
        bad = [o for o in objects if o not in truth]
        mentions += len(objects)
        hallucinated += len(bad)
        with_hallucination += bool(bad)
        covered += len(truth & set(objects))
        truth_total += len(truth)
        words += len(caption.split())
        for o in bad:
            hallucinated_words[o] = hallucinated_words.get(o, 0) + 1
    return {
        "chair_s": with_hallucination / len(captions),
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": covered / truth_total if truth_total else 0.0,
        "mean_length": words / len(captions),
        "mentions": mentions,
        "hallucinated": hallucinated,
        "hallucinated_words": dict(sorted(hallucinated_words.items())),
        "n": len(captions),
    }
