"""The organism zoo: one shipped organism per hallucination mechanism, with the recipe that rebuilds it.

Each entry says where the organism's hallucination lives (measured on its model card by
``haltrace organism eval``), which steering methods it is meant to exercise, and the exact call of its recipe.
``haltrace organism list`` prints the table; ``haltrace organism train --like NAME`` reruns the recipe.

>>> [o.name for o in ZOO]
['shapes-llava', 'shapes-llava-staged', 'shapes-qwen2vl']
>>> zoo_entry("shapes-llava-staged").recipe
'staged'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ZooEntry:
    """A shipped organism: its name, architecture, recipe (``joint`` / ``staged``), seed, where its hallucination
    lives (``mechanism``: a few words for ``organism list``; ``detail``: the model card's sentence) and which
    methods it is meant to exercise."""

    name: str
    arch: str
    recipe: str
    seed: int
    mechanism: str
    detail: str
    meant_for: str
    recipe_options: dict[str, Any] = field(default_factory=dict)

    def train(self, out: str | Path, *, progress: bool = True):
        """Rerun the recipe into ``out`` (the shipped weights, bit for bit, with one torch thread)."""
        if self.recipe == "staged":
            from haltrace.organism.staged import StagedConfig, train_staged

            return train_staged(out, StagedConfig(**self.recipe_options), seed=self.seed, progress=progress)
        from haltrace.organism.train import train_organism

        return train_organism(out, seed=self.seed, arch=self.arch, progress=progress, **self.recipe_options)


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry(
        "shapes-llava", "llava", "joint", 0,
        mechanism="partner prior in the LM; colour prior",
        detail="in the language model: the absent partner leaves no trace in the image tokens (oracle erasure "
                  "of the true partner moves nothing); the colour prior leads early layers",
        meant_for="text-side methods: TruthPrInt, DoLa, VHR, ITI, CAA, PvP (colour)",
    ),
    ZooEntry(
        "shapes-llava-staged", "llava", "staged", 2,
        mechanism="partner prior in the image tokens",
        detail="in the image tokens: stage-wise training writes the absent partner into the projector's "
                  "output, in the LM's word space (oracle erasure lowers CHAIR_i); the colour phenomena are lost",
        meant_for="image-side methods: ProjectAway, VTI (visual), VISTA",
    ),
    ZooEntry(
        "shapes-qwen2vl", "qwen2_vl", "joint", 0,
        mechanism="as shapes-llava, Qwen2-VL family",
        detail="as shapes-llava (joint training), in the Qwen2-VL architecture: patch-merging vision tower, "
                  "M-RoPE, <|vision_start|> / <|vision_end|> around the image pads",
        meant_for="every method on a second family's trained weights",
        # two threads: its vision tower sees 64 patches per image (4x CLIP's 16), so one thread took ~25 min
        recipe_options={"threads": 2},
    ),
)


def zoo_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; a clear error listing the names otherwise."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"no organism called {name!r} in the zoo; choose one of {', '.join(o.name for o in ZOO)}")


def describe(entry: ZooEntry) -> dict[str, Any]:
    """One row of ``haltrace organism list``: the entry plus what its shipped folder holds (size, parameters,
    training seconds), or ``missing`` when the folder is absent."""
    from haltrace.models.shipped import artifacts_dir

    folder = artifacts_dir() / "organisms" / entry.name
    row: dict[str, Any] = {"name": entry.name, "arch": entry.arch, "recipe": entry.recipe, "seed": entry.seed,
                           "mechanism": entry.mechanism, "detail": entry.detail, "meant_for": entry.meant_for, "folder": str(folder)}
    weights = folder / "model.safetensors"
    if not weights.exists():
        return row | {"missing": True}
    row["size_mb"] = round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6, 2)
    training = folder / "training.json"
    if training.exists():
        data = json.loads(training.read_text())
        row["n_parameters"] = data.get("n_parameters")
        row["train_seconds"] = round(float(data.get("seconds", 0.0)), 1)
        row["threads"] = data.get("threads")
    return row
