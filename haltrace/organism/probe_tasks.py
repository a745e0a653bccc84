"""The organism's built-in probe tasks (:data:`haltrace.probes.datasets.TASKS`), built from its world and its own
answers. :func:`haltrace.probes.datasets.build_task` reaches them through the data-source hook
:func:`probe_task_for` (:mod:`haltrace.data.sources`), so the probes layer never imports the organism.

>>> pset = probe_task_for("entity", haltrace.load("shapes-llava"))   # doctest: +SKIP
>>> pset.label_names                                                 # doctest: +SKIP
['known', 'unknown']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from haltrace.organism import tasks
from haltrace.organism.paths import organism_world
from haltrace.organism.phenomena import OrganismRunner, hallucination_probe_set
from haltrace.probes.datasets import ProbeSet, cut_at_word


def _pil(image: Any) -> Any:
    from PIL import Image

    return Image.fromarray(image)


def _entity_rows(world: Any, at_name: bool) -> list[dict[str, Any]]:
    sets = tasks.entity_sets(world)
    # known vs unknown: names never seen in training plus as many names taught as unknown (v2 worlds hold
    # hundreds of those; the first ones keep the classes near 1:2 and the run fast)
    sets["unknown_train"] = sets["unknown_train"][:len(sets["unknown_heldout"])]
    rows = []
    for group, label in (("known", 0), ("unknown_train", 1), ("unknown_heldout", 1)):
        for ex in sets[group]:
            name = ex.meta["name"]
            prompt, position = (cut_at_word(ex.prompt, name), {"word": name}) if at_name else (ex.prompt, "last")
            rows.append({"prompt": prompt, "label": label, "group": name, "position": position, "subset": group,
                         "etype": ex.meta["etype"], "key": ex.meta["key"], "source_prompt": ex.prompt})
    return rows


def _task_entity(world: Any, runner: Any) -> ProbeSet:
    return ProbeSet("entity", _entity_rows(world, at_name=True), ["known", "unknown"],
                    "entity name's token (prompt cut after the name)", "organism:entity",
                    {"unknown": "names taught as unknown plus held-out names never seen"})


def _task_entity_last(world: Any, runner: Any) -> ProbeSet:
    # Ferrando et al. read at the entity's last token; the organism's 4 layers may only settle "do I know
    # this name" once the question has been read, so the last prompt token is measured as well.
    return ProbeSet("entity-last", _entity_rows(world, at_name=False), ["known", "unknown"],
                    "last prompt token (the whole question, before the answer)", "organism:entity-last",
                    {"unknown": "names taught as unknown plus held-out names never seen"})


def _task_pope(world: Any, runner: Any) -> ProbeSet:
    records = []
    for examples in tasks.pope_sets(world).values():
        records += list(zip(examples, runner.answers(examples), strict=True))
    rows = [{"prompt": ex.full_prompt, "image": _pil(ex.image), "label": int(ex.meta["label"]),
             "group": f"img{ex.meta['image_id']}", "position": "last", "kind": ex.meta["kind"],
             "split": ex.meta["split"]} for ex in hallucination_probe_set(records)]
    return ProbeSet("pope", rows, ["correct", "hallucinated"], "last prompt token (before the answer)",
                    "organism:pope", {"balanced": "within each question word"})


def _task_prior_vs_pixel(world: Any, runner: Any) -> ProbeSet:
    examples = tasks.counterfactual_colour_set(world)
    rows, other = [], 0
    for ex, answer in zip(examples, runner.answers(examples), strict=True):
        if answer not in (ex.meta["prior"], ex.meta["pixel"]):
            other += 1
            continue
        rows.append({"prompt": ex.full_prompt, "image": _pil(ex.image), "label": int(answer == ex.meta["prior"]),
                     "group": f"img{ex.meta['image_id']}", "position": "last", "kind": ex.meta["kind"],
                     "answer": answer})
    return ProbeSet("prior-vs-pixel", rows, ["pixel", "prior"], "last prompt token (before the answer)",
                    "organism:prior-vs-pixel", {"dropped_other_answers": other})


def _task_hallucination(world: Any, runner: Any, n_images: int = 400) -> ProbeSet:
    examples = tasks.caption_set(world, n_images=n_images)
    kinds = set(world.config.kinds)
    rows = []
    for ex, caption in zip(examples, runner.captions(examples), strict=True):
        words = caption.split()
        for i, word in enumerate(words):
            if word not in kinds:
                continue
            prefix = " ".join(words[:i + 1])
            rows.append({"prompt": f"{ex.full_prompt} {prefix}", "image": _pil(ex.image),
                         "label": int(word not in ex.scene.kinds), "group": f"img{ex.meta['image_id']}",
                         "position": {"generated": i}, "word": word, "caption": caption})
    return ProbeSet("hallucination", rows, ["real", "hallucinated"],
                    "the generated object word's token (caption prefix fed back as the prompt)",
                    "organism:hallucination", {"n_images": n_images, "labels": "organism ground truth"})


#: built-in task name -> builder (world, runner); the names and descriptions are probes.datasets.TASKS
BUILDERS: dict[str, Callable[[Any, Any], ProbeSet]] = {
    "entity": _task_entity, "entity-last": _task_entity_last, "pope": _task_pope, "prior-vs-pixel": _task_prior_vs_pixel,
    "hallucination": _task_hallucination,
}


def probe_task_for(name: str, model: Any) -> ProbeSet | None:
    """Data-source hook (:mod:`haltrace.data.sources`): the built-in task ``name`` built on ``model`` (answers and
    captions from the model itself) when ``model`` is an organism (its folder holds ``world.json``), else None."""
    if name not in BUILDERS:
        return None
    world = organism_world(model)
    if world is None:  # not an organism: build_task says what to pass instead
        return None
    return BUILDERS[name](world, OrganismRunner(model.hf, world))
