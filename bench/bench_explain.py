"""Cost of ``haltrace.explain``: one explained answer vs one plain ``generate()`` of the same answer.

Models: the shipped organism (one caption image, ``"caption :"``) and a random Llama-backed LLaVA, 8 layers x 512
wide, 2048-word vocabulary, CLIP tower with 576 image tokens (LLaVA-1.5's 24x24 grid), eager attention, greedy
answers of 32 new tokens. Conditions, interleaved in a rotating order every round (bench/paired.py):

* ``generate``: ``model.hf.generate(**inputs, max_new_tokens=32, do_sample=False)`` on the same (eager) model
* ``explain``: ``haltrace.explain(model, image, prompt, max_new_tokens=32)``: generation with the recording hooks,
  the lens of every token over all image patches and layers, attention maps, CHAIR words, the JSON-ready data
  (the HTML page is not written: that is string formatting of the same numbers)

Goal: explain <= 3x generate on the 8x512 LLaVA; explain <= 5 s on one organism image.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_explain.py            # writes its section of RESULTS.md
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_explain.py --quick --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## Explain cost"
NEW_TOKENS = 32
GOAL_RATIO, GOAL_ORGANISM_S = 3.0, 5.0

from bench import paired  # noqa: E402
from bench.paired import median_and_quartiles, paired_ratios, paired_rounds  # noqa: E402


def organism_case() -> tuple[str, Any, Any, str]:
    import haltrace
    from haltrace.organism import tasks
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world

    model = haltrace.load("shapes-llava", attn_implementation="eager", device="cpu")
    item = tasks.caption_set(load_world(resolve_organism("shapes-llava")))[1]
    return "organism shapes-llava (4 x 128, 16 image tokens)", model, item.image, "caption :"


def llava_8x512_case() -> tuple[str, Any, Any, str]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from haltrace.models import Model
    from haltrace.models.tiny import tiny_image

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = ["describe", "the", "image"] + [f"w{i}" for i in range(2048 - len(specials) - 3)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<image>"], padding_side="left")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576)
    cfg._attn_implementation = "eager"
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens in both conditions
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336},
                                                                crop_size={"height": 336, "width": 336}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    model = Model.from_hf(hf, proc, name="random-llava-8x512")
    return "random LLaVA, Llama 8 x 512, 576 image tokens, vocab 2048", model, tiny_image(0, 336), \
        "<image> describe the image"


def measure(model: Any, image: Any, prompt: str, reps: int, warmup: int) -> dict[str, Any]:
    import haltrace
    from haltrace.explain import _prompt_text, load_image

    pil = load_image(image)
    inputs = model.prepare([_prompt_text(model, prompt, True, None)], images=[pil])
    answers: dict[str, list[int]] = {}

    def run(name: str) -> float:
        start = time.perf_counter()
        if name == "generate":
            with torch.inference_mode():
                out = model.hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=model.tokenizer.pad_token_id)
            seconds = time.perf_counter() - start
            answers[name] = out[0, inputs["input_ids"].shape[1]:].tolist()
        else:
            ex = haltrace.explain(model, pil, prompt, max_new_tokens=NEW_TOKENS)
            seconds = time.perf_counter() - start
            answers[name] = [t["id"] for t in ex.tokens]
        return seconds

    names = ["generate", "explain"]
    for _ in range(warmup):
        for name in names:
            run(name)
    times, rounds = paired_rounds(run, names, reps)
    n = len(answers["explain"])
    if answers["generate"][:n] != answers["explain"]:
        raise RuntimeError(f"explain answered {answers['explain']} but generate {answers['generate']}")
    med, q1, q3 = median_and_quartiles(paired_ratios(times, "generate")["explain"])
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "ratio": med, "q": [q1, q3],
            "reps": rounds, "n_tokens": n, "n_image_tokens": int(model.image_token_mask(inputs["input_ids"]).sum())}


def section(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [HEADING, "",
             f"`bench/bench_explain.py` (`--reps {args.reps} --warmup {args.warmup} --threads {args.threads}`), "
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores shared with other jobs. `haltrace.explain` of one image and prompt (greedy "
             f"answer, up to {NEW_TOKENS} new tokens; the lens of every token over every image patch and layer, "
             "attention maps, lens trajectories, CHAIR words) vs one plain `generate()` of the same answer on the "
             "same eager model, interleaved in a rotating order; ratio = median over rounds of explain / generate "
             "within a round [q1-q3]. Goals: <= 3x generate on the 8 x 512 LLaVA, <= 5 s on one organism image.",
             "", "| model | answer tokens | reps | generate median (s) | explain median (s) | explain / generate "
                 "[q1-q3] | goal |", "|---|---:|---:|---|---|---|---|"]
    for label, r in results:
        if "organism" in label:
            goal = f"<= {GOAL_ORGANISM_S:.0f} s: {'met' if r['median_s']['explain'] <= GOAL_ORGANISM_S else 'missed'}"
        else:
            goal = f"<= {GOAL_RATIO:.0f}x: {'met' if r['ratio'] <= GOAL_RATIO else 'missed'}"
        lines.append(f"| {label} | {r['n_tokens']} | {r['reps']} | {r['median_s']['generate']:.3f} | "
                     f"{r['median_s']['explain']:.3f} | {r['ratio']:.2f}x [{r['q'][0]:.2f}-{r['q'][1]:.2f}] | "
                     f"{goal} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """This bench's section of RESULTS.md (``HEADING``), the others kept."""
    paired.write_section(text, HEADING, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 warm-up")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup = 2, 1
    torch.set_num_threads(args.threads)
    results = []
    for build in (organism_case, llava_8x512_case):
        label, model, image, prompt = build()
        r = measure(model, image, prompt, args.reps, args.warmup)
        print(f"{label}: generate {r['median_s']['generate']:.3f}s explain {r['median_s']['explain']:.3f}s "
              f"ratio {r['ratio']:.2f}x ({r['n_tokens']} tokens, {r['n_image_tokens']} image tokens)", flush=True)
        results.append((label, r))
    text = section(results, args)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
