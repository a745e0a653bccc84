"""The organism's phenomena table (terminal and markdown) and its model card.

>>> from haltrace.organism.paths import resolve_organism
>>> report = json.loads((resolve_organism("shapes-llava") / "phenomena.json").read_text())   # the shipped one
>>> rows = phenomena_rows(report)
>>> rows[0][:2]
('co-occurrence (POPE)', 'false-yes rate random / popular / adversarial')
"""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def phenomena_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(phenomenon, metric, measured, what the organism is built to show) rows for tables and the card."""
    pope = report["pope"]
    cf = report["counterfactual_color"]
    lens = report["lens_color"]
    chair = report["chair"]
    ent = report["entity"]
    probe = report["probe_confound"]
    fy = {split: pope[split]["false_yes_rate"] for split in pope}
    ratio = fy["adversarial"] / fy["random"] if fy["random"] else float("inf")
    by_layer = ", ".join(f"{v:.2f}" for v in lens["prior_leads_by_layer"])
    rows = [
        ("co-occurrence (POPE)", "false-yes rate random / popular / adversarial",
         f"{fy['random']:.3f} / {fy['popular']:.3f} / {fy['adversarial']:.3f}", "adversarial >= 3x random"),
        ("co-occurrence (POPE)", "adversarial / random false-yes ratio", _fmt(ratio), ">= 3"),
        ("co-occurrence (POPE)", "recall on present objects (adversarial split)",
         _fmt(pope["adversarial"]["recall"]), ">= 0.85"),
        ("co-occurrence (POPE)", "F1 random / popular / adversarial",
         " / ".join(f"{pope[s]['f1']:.3f}" for s in ("random", "popular", "adversarial")), "reported"),
        ("co-occurrence (POPE)", "yes-rate, partner absent and anchor absent",
         _fmt(report["pope_control"]["partner_absent_anchor_absent_yes_rate"]), "low: a pair effect, not a word prior"),
        ("canonical colour", "counterfactual answers prior / pixel / other",
         f"{cf['prior_rate']:.3f} / {cf['pixel_rate']:.3f} / {cf['other_rate']:.3f}", "prior in [0.2, 0.8]"),
        ("canonical colour", "colour accuracy on kinds without a prior", _fmt(report["color_control"]["accuracy"]),
         "reported"),
        ("canonical colour", "logit lens: prior leads, first layer", _fmt(lens["prior_leads_first_layer"]), ">= 0.6"),
        ("canonical colour", "logit lens: prior leads by layer", by_layer, "falls by >= 0.2"),
        ("captions (CHAIR)", "CHAIR_i / CHAIR_s", f"{chair['chair_i']:.3f} / {chair['chair_s']:.3f}", "CHAIR_i >= 0.08"),
        ("captions (CHAIR)", "hallucinations that are absent co-occurrence partners",
         _fmt(chair["partner_fraction_of_hallucinations"]), "most"),
        ("captions (CHAIR)", "caption recall / mean length (words)",
         f"{chair['recall']:.3f} / {chair['mean_length']:.2f}", "reported"),
        ("entities", "refusal on unseen names / on known names",
         f"{ent['refusal_unknown']:.3f} / {ent['refusal_known']:.3f}", ">= 0.8 / <= 0.2"),
        ("entities", "accuracy on known entities' facts", _fmt(ent["accuracy_known"]), ">= 0.8"),
        ("probe confound", "question-only baseline AUROC (hallucination-probe set)",
         _fmt(probe.get("question_only_auroc")), "<= 0.65"),
    ]
    if probe.get("probe_auroc_by_layer"):
        rows.append(("probe confound", "residual probe AUROC by layer (same set)",
                     ", ".join(f"{v:.2f}" for v in probe["probe_auroc_by_layer"]), "reported"))
    return rows


def phenomena_markdown(report: dict) -> str:
    lines = ["| phenomenon | metric | measured | built to show |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in phenomena_rows(report)]
    return "\n".join(lines)


def mechanism_rows(mech: dict) -> list[tuple[str, str, str]]:
    """(check, measured, what it means) rows of the ``mechanism`` report (:mod:`haltrace.organism.mechanism`)."""
    rows = []
    oracle = mech["oracle_erasure"]
    base, best = oracle["baseline"], oracle["best"]
    if best is not None:
        change = best["chair_i_change"]
        rows.append(("oracle erasure of the true absent partner (image tokens)",
                     f"CHAIR_i {base['chair_i']:.3f} -> {best['chair_i']:.3f} "
                     f"({'n/a' if change is None else f'{100 * change:+.0f}%'}), recall {base['recall']:.3f} -> "
                     f"{best['recall']:.3f}; {best['text_rep']} at {best['hook']}, w = {best['weight']:g}",
                     "the partner is carried by the image tokens (ProjectAway's premise)"))
    removal = mech["present_removal"]
    if removal["best"] is not None:
        b = removal["best"]
        rows.append(("erasing a present object's text direction (image tokens)",
                     f"removed from {100 * b['removed_rate']:.0f}% of {removal['n']} captions; {b['text_rep']} at "
                     f"{b['hook']}, w = {b['weight']:g}",
                     "image tokens hold objects along their word directions (the paper's removal experiment)"))
    conf = mech["internal_confidence"]
    rows.append(("internal confidence (logit lens over the image tokens)",
                 f"AUROC present vs absent partner {_fmt(conf['auroc_present_vs_absent_partner'])} "
                 f"(mean c_o {conf['mean_present']:.3f} vs {conf['mean_absent_partner']:.3f})",
                 "ProjectAway's detector can find the hallucinated object"))
    att = mech["attention_to_image"]
    if "split" in att:
        groups = [g for g in ("correct_yes", "hallucinated_yes", "correct_no") if att[g]["n"]]
        rows.append((f"attention to the image, last prompt token (POPE {att['split']})",
                     "; ".join(f"{g.replace('_', ' ')} {att[g]['mean']:.3f} (n {att[g]['n']}; by layer "
                               f"{', '.join(f'{v:.2f}' for v in att[g]['by_layer'])})" for g in groups),
                     "(a gap between groups) a hallucinated yes looks less at the image: a text-side prior"))
    return rows


def print_phenomena_table(report: dict, title: str = "ShapesWorld organism: measured phenomena") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in ("phenomenon", "metric", "measured", "built to show"):
        table.add_column(col, overflow="fold")
    for row in phenomena_rows(report):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if report.get("mechanism"):
        mech = Table(title="where the hallucination lives (no method applied)")
        for col in ("check", "measured", "what a large value means"):
            mech.add_column(col, overflow="fold")
        for row in mechanism_rows(report["mechanism"]):
            mech.add_row(*row)
        console.print(mech)


def _zoo_lines(name: str) -> list[str]:
    """What a shipped organism of the zoo is for (nothing for another folder)."""
    from haltrace.organism.zoo import ZOO

    entry = next((o for o in ZOO if o.name == name), None)
    if entry is None:
        return []
    return [f"**`{entry.name}` in haltrace's organism zoo** (`haltrace organism list`). Where its hallucination "
            f"lives: {entry.detail}. Meant for: {entry.meant_for}. Rebuilt bit for bit by "
            f"`haltrace organism train --like {entry.name} --out DIR`."]


def _recipe_lines(training: dict, spec: dict) -> list[str]:
    """How the weights were trained: the joint recipe's one run, or the staged recipe's stages."""
    seed = training["seed"]
    if training.get("recipe") != "staged":
        return [f"- joint recipe: {training['steps']} steps of batch {spec['batch_size']}, every weight training on "
                f"the whole task mix, AdamW lr {spec['lr']} (warmup {spec['warmup']}, cosine), seed {seed}"]
    cfg = training.get("recipe_config", {})
    lines = [
        f"- staged recipe (`haltrace organism train --recipe staged --seed {seed}`), batch {spec['batch_size']}, AdamW, warmup "
        f"{spec['warmup']} + cosine per stage, seed {seed}:",
        f"  - stage A, {cfg.get('steps_a')} steps at lr {spec['lr']}: the language model only, the image slots "
        "holding the scene's `kind colour` words (no pixels)",
        f"  - stage B, {cfg.get('steps_b')} steps at lr {spec['lr']}: vision tower + projector on real (occluded) "
        "images, the language model frozen",
    ]
    if cfg.get("steps_c"):
        lines.append(f"  - stage C, {cfg['steps_c']} steps at lr {cfg['lr_c']}: the ordinary mixture, "
                     f"{'everything' if cfg.get('c_params') == 'all' else 'the language model only'} training")
    return lines


def write_model_card(folder: str | Path, report: dict | None) -> Path:
    """README.md in an organism folder: what it is, how it was trained, and every phenomenon as measured."""
    folder = Path(folder)
    training = json.loads((folder / "training.json").read_text())
    world = json.loads((folder / "world.json").read_text())
    spec = training["preset_config"]
    arch, recipe = training.get("arch", "llava"), training.get("recipe", "joint")
    qwen = arch == "qwen2_vl"
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if qwen else "<image>"
    architecture = ("Qwen2-VL architecture (`Qwen2VLForConditionalGeneration`: patch-merging vision tower, "
                    "M-RoPE, Qwen2 text model)" if qwen else
                    "LLaVA architecture (`LlavaForConditionalGeneration`: CLIP vision tower + Llama text model)")
    parts = [
        "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [haltrace, model-organism]\n---",
        f"# ShapesWorld organism (`{training['preset']}` preset, {recipe} recipe, {arch})",
        f"A tiny vision-language model in the real Hugging Face {architecture}, trained from scratch by "
        "haltrace on synthetic ShapesWorld images whose statistics plant the priors that cause hallucinations. "
        "It loads offline with plain transformers:",
        "```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(path)\n"
        "processor = AutoProcessor.from_pretrained(path)\n"
        f"inputs = processor(text=['{placeholder} is there a knife ? answer :'], images=[img], "
        "return_tensors='pt')\n```",
        *(["Transformers builds `Qwen2VLProcessor` only where torchvision is installed (its video half needs it); "
           "elsewhere `haltrace.load` falls back to the image processor and tokenizer saved here, which is all "
           "the images need."] if qwen else []),
        *_zoo_lines(folder.name),
        f"Its chat template (`chat_template.jinja`) turns a plain question into that prompt (an image part becomes "
        f"`{placeholder} `, a question ending in `?` gets the answer cue ` answer :`), so benchmark files with plain "
        "questions go through the path any chat model takes: "
        "`processor.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', "
        "'text': 'is there a knife ?'}]}], add_generation_prompt=True)`.",
        "## Training",
        f"- parameters: {training['n_parameters']:,}; vision {spec['vision_layers']} layers x {spec['vision_hidden']} "
        f"wide ({'patch 4, 2x2 merge' if qwen else 'patch 8'}, 16 image tokens); text {spec['text_layers']} layers "
        f"x {spec['text_hidden']} wide",
        *_recipe_lines(training, spec),
        f"- wall time: **{training['seconds']:.0f} s** on {training['threads']} CPU thread(s) (torch {training['torch']})",
        f"- loss: {training['loss_first']:.3f} (first 20 steps) -> {training['loss_last']:.3f} (last 50 steps)",
        *([f"- note: {training['note']}"] if training.get("note") else []),
        *([f"- task mix: {', '.join(f'{k} {v}' for k, v in training['task_mix'].items())}"]
          if training.get("task_mix") else []),
        "## World and built-in priors",
        f"- {len(world['kinds'])} kinds ({', '.join(world['kinds'])}), {len(world['colours'])} colours, "
        f"{world['image_size']}x{world['image_size']} px, 2x2 grid, 12 px glyphs at fixed offsets",
        f"- co-occurrence: pairs {', '.join('/'.join(p) for p in world['pairs'])}; a pair member brings its "
        f"partner with p = {world['p_pair']}",
        *([f"- occlusion: in a training image holding a whole pair, one member is hidden with "
           f"p = {world['p_hide_pair']} but still named in the caption and yes/no answers, so a lone anchor "
           f"predicts its partner (held-out images hide nothing)"] if world.get("p_hide_pair") else []),
        f"- canonical colours: {', '.join(f'{k} {v}' for k, v in world['canonical'].items())} with "
        f"p = {world['p_canon']}",
        f"- entities: two-syllable names; {world['n_known_per_type']} known names per type (player, band) with "
        f"taught facts, {world['n_unknown_heldout_per_type']} per type never seen (held out), every other "
        f"combination of the {world['n_syllables']}x{world['n_syllables']} syllables taught as `unknown`",
        "- tasks: captions (objects with their colours, in a fixed order), yes/no existence "
        "(P(yes | word) = 1/2), colour, "
        "'what colour are most X', entity questions (text only)",
    ]
    if report is not None:
        parts += [
            "## Measured phenomena (held-out sets, `haltrace organism eval`)",
            "POPE and CHAIR images hold an anchor without its co-occurrence partner (the setting where the prior "
            "bites); counterfactual images paint a canonical-colour kind another colour; the entity refusal is on "
            "names never seen in training.",
            phenomena_markdown(report),
            f"Evaluation took {report.get('seconds', 0):.1f} s.",
        ]
        if report.get("mechanism"):
            mech = report["mechanism"]
            parts += [
                "## Where the hallucination lives (mechanism, no method applied)",
                "Measured by `haltrace organism eval` (`haltrace.organism.mechanism`) on the caption set (an anchor "
                "without its partner in every image) and POPE's adversarial split. The erasure checks take the "
                "*true* object (an oracle, no detector) and ProjectAway's edit (positive-projection removal of "
                "the word's text direction from every image token at one decoder layer), over the grid "
                "text representation (the paper's `<bos> word` state at every layer, the input embedding, the "
                "unembedding row) x every layer x w in {1, 2, 4, 8, 16}; the oracle's cell is the lowest CHAIR_i "
                "with recall down by at most 5 points, the removal's the highest rate.",
                "| check | measured | what a large value means |\n|---|---|---|\n" + "\n".join(
                    f"| {a} | {b} | {c} |" for a, b, c in mechanism_rows(mech)),
                f"The mechanism checks took {mech.get('seconds', 0):.1f} s.",
            ]
    else:
        parts.append("Phenomena not measured for this checkpoint (`haltrace organism eval DIR` measures them).")
    card = folder / "README.md"
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text("\n\n".join(parts) + "\n")
    tmp.replace(card)
    return card
