"""CHAIR (Rohrbach et al. 2018): object hallucination in captions.

CHAIR_i = hallucinated object mentions / all object mentions (repeats counted, as the original does);
CHAIR_s = captions with at least one hallucinated object / captions. A mention is hallucinated when its
canonical word (through ``synonyms``) is not in the image's ground-truth set. Also reports recall
(|mentioned ∩ truth| / |truth|) and mean caption length in words, because CHAIR depends on length.

>>> chair_metrics(["fork knife", "cup"], [{"fork"}, {"cup"}], vocabulary={"fork", "knife", "cup"})["chair_i"]
0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def caption_objects(caption: str, vocabulary: Iterable[str],
                    synonyms: Mapping[str, str] | None = None) -> list[str]:
    """Canonical object words mentioned in a caption, in order, repeats kept.

    Lower-cases, strips punctuation, maps each word through ``synonyms`` (word -> canonical), keeps words in
    ``vocabulary``. (COCO's two-word compounds and singularisation live in the COCO reader, not here.)
    """
    vocab = set(vocabulary)
    synonyms = synonyms or {}
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in caption.lower()).split()
    found = []
    for word in words:
        canonical = synonyms.get(word, word)
        if canonical in vocab:
            found.append(canonical)
    return found


def chair_metrics(captions: Sequence[str], truths: Sequence[Iterable[str]], *, vocabulary: Iterable[str],
                  synonyms: Mapping[str, str] | None = None) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, recall, mean length, and the hallucinated words with their counts."""
    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions but {len(truths)} ground-truth sets")
    if not captions:
        raise ValueError("no captions to score")
    vocab = set(vocabulary)
    mentions = hallucinated = with_hallucination = covered = truth_total = 0
    words = 0
    hallucinated_words: dict[str, int] = {}
    for caption, truth in zip(captions, truths, strict=True):
        truth = set(truth)
        objects = caption_objects(caption, vocab, synonyms)
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
