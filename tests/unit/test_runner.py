"""The generation runner on a tiny random LLaVA: rows in job order, resuming a killed run (torn last line, partial
batch) gives the uninterrupted run's file byte for byte, other settings or other questions are refused; and
``build_prompt`` with a chat template and with a ``{question}`` template."""

from __future__ import annotations

import json
import shutil

import pytest

from haltrace.evals import runner
from haltrace.evals.runner import GenerationSettings, Job, ResumeError, run_jobs
from haltrace.models.prompting import build_prompt, prompt_style
from haltrace.models.tiny import tiny_image

QUESTIONS = ["is there a red circle ?", "what color is the square ?", "is there a star ?", "describe the image",
             "is the triangle blue ?", "one two three ?", "is there a green star on the left ?"]
SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=3)  # 7 jobs: batches of 3, 3 and 1


def _jobs(keys=None) -> list[Job]:
    keys = keys or list(range(101, 101 + len(QUESTIONS)))
    return [Job(key, q, tiny_image(i)) for i, (key, q) in enumerate(zip(keys, QUESTIONS, strict=True))]


def _row(job: Job, text: str) -> dict:
    return {"question_id": job.key, "prompt": job.question, "text": text}


def _run(model, out, settings=SETTINGS, jobs=None, **kw):
    return run_jobs(model, jobs or _jobs(), out, row=_row, key_field="question_id", settings=settings,
                    task="unit", **kw)


@pytest.fixture
def batches(monkeypatch):
    """Records the size of every batch the runner generates."""
    sizes: list[int] = []
    inner = runner.generate_texts

    def counting(model, jobs, settings, **kw):
        sizes.append(len(jobs))
        return inner(model, jobs, settings, **kw)

    monkeypatch.setattr(runner, "generate_texts", counting)
    return sizes


@pytest.fixture(scope="module")
def reference(tiny_llava, tmp_path_factory):
    """An uninterrupted run's answers file (and its rows)."""
    out = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    rows = _run(tiny_llava, out)
    return out, rows


def test_one_row_per_job_in_order(tiny_llava, reference):
    out, rows = reference
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [r["question_id"] for r in rows] == [j.key for j in _jobs()]
    assert [r["prompt"] for r in rows] == QUESTIONS
    assert all(isinstance(r["text"], str) for r in rows)
    record = json.loads(out.with_name("answers.jsonl.run.json").read_text())
    assert record == {"task": "unit", "model": "tiny-llava", "intervention": None, "prompt_style": "plain",
                      "max_new_tokens": 4, "num_beams": 1, "batch_size": 3, "template": None}
    assert out.stat().st_mode & 0o777 == 0o644
    # the rows are what one batch generates: the runner adds nothing of its own
    first = runner.generate_texts(tiny_llava, _jobs()[:3], SETTINGS)
    assert [r["text"] for r in rows[:3]] == first


@pytest.mark.parametrize(("kept_lines", "torn", "regenerated"), [
    (4, True, [3, 1]),    # a whole batch, one row of the next, then half a line: the partial batch is redone
    (6, True, [1]),       # two whole batches and a torn line
    (5, False, [3, 1]),   # a partial batch, no torn line
    (0, True, [3, 3, 1]),  # killed in the middle of the first batch's line
    (7, False, []),       # a finished run: nothing to do
])
def test_resume_equals_uninterrupted_run(tiny_llava, reference, batches, tmp_path, kept_lines, torn, regenerated):
    ref, ref_rows = reference
    lines = ref.read_bytes().splitlines(keepends=True)
    killed = tmp_path / "answers.jsonl"
    shutil.copy(ref.with_name("answers.jsonl.run.json"), killed.with_name("answers.jsonl.run.json"))
    killed.write_bytes(b"".join(lines[:kept_lines]) + (lines[kept_lines][:25] if torn else b""))
    rows = _run(tiny_llava, killed)
    assert batches == regenerated
    assert killed.read_bytes() == ref.read_bytes()
    assert rows == ref_rows


def test_changed_settings_are_refused(tiny_llava, reference, batches, tmp_path):
    ref, _ = reference
    out = tmp_path / "answers.jsonl"
    shutil.copy(ref, out)
    shutil.copy(ref.with_name("answers.jsonl.run.json"), out.with_name("answers.jsonl.run.json"))
    for other, differs in [(GenerationSettings(max_new_tokens=5, batch_size=3), "max_new_tokens"),
                           (GenerationSettings(max_new_tokens=4, batch_size=2), "batch_size"),
                           (GenerationSettings(max_new_tokens=4, batch_size=3, num_beams=2), "num_beams"),
                           (GenerationSettings(max_new_tokens=4, batch_size=3, template="Q: {question} A:"),
                            "prompt_style, template")]:
        with pytest.raises(ResumeError, match=rf"differs in {differs}\).*another --out, or --overwrite"):
            _run(tiny_llava, out, other)
    with pytest.raises(ResumeError, match="differs in task"):
        run_jobs(tiny_llava, _jobs(), out, row=_row, key_field="question_id", settings=SETTINGS, task="other")
    assert batches == [] and out.read_bytes() == ref.read_bytes()  # refused before generating or writing

    # an answers file without its settings file cannot be vouched for either
    out.with_name("answers.jsonl.run.json").unlink()
    with pytest.raises(ResumeError, match="another run"):
        _run(tiny_llava, out)


def test_overwrite_starts_again(tiny_llava, reference, batches, tmp_path):
    ref, _ = reference
    out = tmp_path / "answers.jsonl"
    shutil.copy(ref, out)
    shutil.copy(ref.with_name("answers.jsonl.run.json"), out.with_name("answers.jsonl.run.json"))
    other = GenerationSettings(max_new_tokens=2, batch_size=2)
    rows = _run(tiny_llava, out, other, overwrite=True)
    assert batches == [2, 2, 2, 1] and len(rows) == len(QUESTIONS)
    assert json.loads(out.with_name("answers.jsonl.run.json").read_text())["batch_size"] == 2
    fresh = tmp_path / "fresh.jsonl"
    _run(tiny_llava, fresh, other)
    assert out.read_bytes() == fresh.read_bytes()
    # overwrite with the same settings also redoes everything
    batches.clear()
    _run(tiny_llava, out, other, overwrite=True)
    assert batches == [2, 2, 2, 1] and out.read_bytes() == fresh.read_bytes()


def test_file_from_other_questions_is_refused(tiny_llava, reference, batches, tmp_path):
    ref, _ = reference
    out = tmp_path / "answers.jsonl"
    lines = ref.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]))
    shutil.copy(ref.with_name("answers.jsonl.run.json"), out.with_name("answers.jsonl.run.json"))
    keys = [101, 102, 103, 999, 105, 106, 107]
    with pytest.raises(ResumeError, match=r"row 4 is for question_id 104 but this run's item 4 is 999: the file "
                                          r"belongs to other questions; use another --out or --overwrite"):
        _run(tiny_llava, out, jobs=_jobs(keys))
    assert batches == [] and out.read_bytes() == b"".join(lines[:4])


def test_settings_and_jobs_are_checked(tiny_llava, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        GenerationSettings(batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        GenerationSettings(max_new_tokens=True)
    with pytest.raises(ValueError, match=r"--prompt-template 'Q:' has no \{question\} field"):
        GenerationSettings(template="Q:")
    with pytest.raises(ValueError, match="nothing to generate"):
        run_jobs(tiny_llava, [], tmp_path / "a.jsonl", row=_row, key_field="question_id")
    mixed = [Job(1, "is there a star ?", tiny_image(0)), Job(2, "is there a star ?")]
    with pytest.raises(ValueError, match="mixes items with and without images"):
        runner.generate_texts(tiny_llava, mixed, SETTINGS)


# a cut-down LLaVA-1.5-hf chat template: images first, then the text, then the generation prompt
LLAVA_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                  "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                  "{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
                  "{{ c['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# a tokenizer's template takes plain string content
TOKENIZER_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_build_prompt_with_a_chat_template(tiny_llava, monkeypatch):
    model = tiny_llava
    assert prompt_style(model) == "plain"
    assert build_prompt(model, "is there a cup ?", image=True) == "<image> is there a cup ?"
    assert build_prompt(model, "is there a cup ?") == "is there a cup ?"

    monkeypatch.setattr(model.processor, "chat_template", LLAVA_TEMPLATE, raising=False)
    assert prompt_style(model) == "chat_template"
    assert build_prompt(model, "is there a cup ?", image=True) == "USER: <image>\nis there a cup ? ASSISTANT:"
    assert build_prompt(model, "is there a cup ?") == "USER: is there a cup ? ASSISTANT:"

    # only the tokenizer has a template: the placeholder goes in front of the question
    monkeypatch.setattr(model.processor, "chat_template", None, raising=False)
    monkeypatch.setattr(model.tokenizer, "chat_template", TOKENIZER_TEMPLATE, raising=False)
    assert prompt_style(model) == "chat_template"
    assert build_prompt(model, "is there a cup ?", image=True) == "<|user|><image>\nis there a cup ?\n<|assistant|>"

    # the prompt the runner builds goes through prepare(): the placeholder becomes the image tokens
    inputs = model.prepare([build_prompt(model, "is there a cup ?", image=True)], [tiny_image(0)])
    assert int(model.image_token_mask(inputs["input_ids"]).sum()) == 4
    with pytest.raises(ValueError, match="empty question"):
        build_prompt(model, "  ", image=True)


def test_build_prompt_with_a_question_template(tiny_llava, tiny_gpt2, monkeypatch):
    model = tiny_llava
    monkeypatch.setattr(model.processor, "chat_template", LLAVA_TEMPLATE, raising=False)  # the template wins
    template = "USER: {question} ASSISTANT:"
    assert prompt_style(model, template) == "template"
    assert build_prompt(model, "is there a cup ?", image=True, template=template) == \
        "<image>\nUSER: is there a cup ? ASSISTANT:"  # the placeholder goes in front
    assert build_prompt(model, "is there a cup ?", image=True, template="USER: {image}\n{question} A:") == \
        "USER: <image>\nis there a cup ? A:"
    assert build_prompt(model, "is there a cup ?", image=True, template="<image> {question}") == \
        "<image> is there a cup ?"  # a template that already holds the placeholder keeps it where it is
    assert build_prompt(model, "is there a cup ?", template=template) == "USER: is there a cup ? ASSISTANT:"
    assert build_prompt(tiny_gpt2, "is the sky blue ?", template="Q: {question} A:") == "Q: is the sky blue ? A:"
    with pytest.raises(ValueError, match=r"has no \{question\} field"):
        build_prompt(model, "is there a cup ?", template="Q: A:")


def test_template_prompts_generate_and_resume(tiny_llava, batches, tmp_path):
    settings = GenerationSettings(max_new_tokens=3, batch_size=4, template="USER: {question} ASSISTANT:")
    out = tmp_path / "answers.jsonl"
    rows = _run(tiny_llava, out, settings)
    assert len(rows) == len(QUESTIONS) and batches == [4, 3]
    assert json.loads(out.with_name("answers.jsonl.run.json").read_text())["prompt_style"] == "template"
    batches.clear()
    assert _run(tiny_llava, out, settings) == rows and batches == []
