"""Teacher corpus generation: filters, self-instruct, augmentation, cache/resume (no network)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from torchmetrics.functional.text.rouge import rouge_score

from kd_lightning.generation.augment import LabelledAugmentationTask, parse_soft_label
from kd_lightning.generation.backends import (
    ChatRequest,
    OpenAITeacher,
    SamplingSettings,
    TeacherBackend,
    TeacherReply,
    public_url,
)
from kd_lightning.generation.runner import ReplyCache, answer_all
from kd_lightning.generation.self_instruct import (
    InstructionFilter,
    SelfInstruct,
    load_seed_tasks,
    parse_instructions,
    rouge_l_f1,
    words,
)
from kd_lightning.generation.tasks import InstructionFileTask, SelfInstructTask

SAMPLING = SamplingSettings(max_new_tokens=32, generation_temperature=0.7)


class ScriptedTeacher(TeacherBackend):
    """Answers with ``respond(user_text, request)``; counts what it was asked."""

    def __init__(self, respond) -> None:
        from kd_lightning.generation.backends import BackendStats

        self.respond = respond
        self.asked: list[ChatRequest] = []
        self.stats = BackendStats()

    def identity(self):
        return {"backend": "scripted", "model": "script"}

    def stream(self, requests):
        for index, request in enumerate(requests):
            self.asked.append(request)
            text = self.respond(request.messages[-1][1], request)
            yield index, TeacherReply(text, prompt_tokens=10, completion_tokens=len(text.split()))


TOPICS = ["volcanoes", "tax law", "chess openings", "sourdough", "jazz history", "glaciers", "bridges",
          "honey bees", "solar panels", "ancient Rome", "sleep", "recycling", "comets", "poetry", "tides"]  # fmt: skip
VERBS = ["Explain", "Summarize", "List facts about", "Write a limerick on", "Compare two kinds of",
         "Give advice about", "Classify opinions on", "Describe the history of"]  # fmt: skip


def proposer(text: str, request: ChatRequest) -> str:
    """A fake teacher: proposals list varied tasks (some bad ones), answers echo the task."""
    if text.startswith("Here are some example tasks"):
        rng = random.Random(text)
        lines = [
            f"{i}. {rng.choice(VERBS)} {rng.choice(TOPICS)} for a {rng.choice(['child', 'student', 'chef', 'pilot', 'farmer'])}."
            for i in range(7, 13)
        ]
        lines += ["13. Draw a picture of a cat.", "14. Hi.", "Some chatter that is not a task."]
        return "\n".join(lines)
    return f"Answer: {text[:40]}"


def test_rouge_l_matches_torchmetrics():
    pairs = [
        ("Explain the water cycle to a child.", "Explain the water cycle for kids."),
        ("List three fruits.", "Name three red fruits, please."),
        ("a b c d e", "e d c b a"),
        ("nothing shared", "totally different"),
    ]
    for a, b in pairs:
        expected = float(rouge_score(a, b, rouge_keys="rougeL")["rougeL_fmeasure"])
        assert rouge_l_f1(words(a), words(b)) == pytest.approx(expected, abs=1e-6)
    assert rouge_l_f1([], ["a"]) == 0.0


def test_instruction_filter_names_each_reason():
    f = InstructionFilter(max_rouge_l=0.7, min_words=3, max_words=12)
    f.add("Explain how a rainbow forms in the sky.")
    assert f.reason_to_drop("Hi there") == "too_short"
    assert f.reason_to_drop("word " * 13) == "too_long"
    assert f.reason_to_drop("- Write a story about dragons.") == "starts_with_punctuation"
    assert f.reason_to_drop("Draw a map of your town.") == "banned_keyword"
    assert f.reason_to_drop("explain how a RAINBOW forms in the sky!") == "duplicate"
    assert f.reason_to_drop("Explain how a rainbow forms in the evening sky.") == "too_similar"
    assert f.reason_to_drop("Write a haiku about winter mornings.") is None


def test_parse_instructions_reads_numbered_and_bulleted_lists():
    reply = "Sure! Here they are:\n7. Explain tides.\n8) Instruction: Name a planet.\n- Give a synonym for happy.\n\nHope this helps."
    assert parse_instructions(reply) == ["Explain tides.", "Name a planet.", "Give a synonym for happy."]
    nested = "1. 1. How to sort a list in Python\n2. 1.1.2: List the people in this sentence.\n3. 3 apples cost $2; what does one cost?"
    assert parse_instructions(nested) == [
        "How to sort a list in Python",
        "List the people in this sentence.",
        "3 apples cost $2; what does one cost?",
    ]


def test_shipped_seed_tasks_are_many_diverse_and_distinct():
    seeds = load_seed_tasks()
    assert len(seeds) >= 50
    categories = Counter(t.category for t in seeds)
    assert {"open_qa", "reasoning", "writing", "classification", "extraction", "maths"} <= set(categories)
    assert max(categories.values()) <= len(seeds) // 4
    tokens = [words(t.instruction) for t in seeds]
    for i in range(len(tokens)):
        for j in range(i):
            assert rouge_l_f1(tokens[i], tokens[j]) < 0.7, (seeds[i].instruction, seeds[j].instruction)


def test_request_key_separates_what_changes_the_answer():
    base = ChatRequest.user("hi there", SAMPLING)
    teacher = {"backend": "x", "model": "m"}
    assert base.key(teacher) == ChatRequest.user("hi there", SAMPLING).key(teacher)
    others = [
        ChatRequest.user("hi there", SAMPLING, sample_index=1),
        ChatRequest.user("hi there", SamplingSettings(max_new_tokens=32, generation_temperature=0.0)),
        ChatRequest.user("hi there", SAMPLING, system="be brief"),
    ]
    keys = {base.key(teacher), *(o.key(teacher) for o in others), base.key({"backend": "x", "model": "n"})}
    assert len(keys) == 5


def test_self_instruct_grows_filters_and_replays_from_cache(tmp_path):
    task = SelfInstructTask(
        SelfInstruct(num_instructions=20, proposals_per_round=3, new_per_proposal=6, seed=1)
    )
    teacher = ScriptedTeacher(proposer)
    result = task.run(teacher, ReplyCache(tmp_path / "cache"), SAMPLING, progress=False)
    grown = [r for r in result.records if r.meta["source"] == "self_instruct"]
    assert len(grown) == 20
    assert len([r for r in result.records if r.meta["source"] == "seed"]) == len(load_seed_tasks())
    assert result.dropped["instruction_banned_keyword"] > 0 and result.dropped["instruction_too_short"] > 0
    assert len({r.key for r in result.records}) == len(result.records)
    for r in grown:
        assert r.response.startswith("Answer:") and r.meta["teacher"] == "script"
        assert r.meta["generation_temperature"] == "0.7"
    asked = len(teacher.asked)
    # A rerun over the same cache replays the same rounds and asks the teacher nothing.
    again = SelfInstructTask(
        SelfInstruct(num_instructions=20, proposals_per_round=3, new_per_proposal=6, seed=1)
    )
    teacher2 = ScriptedTeacher(proposer)
    result2 = again.run(teacher2, ReplyCache(tmp_path / "cache"), SAMPLING, progress=False)
    assert teacher2.asked == [] and asked > 0
    assert [r.instruction for r in result2.records] == [r.instruction for r in result.records]
    assert result2.usage.cached == result.usage.answered


def test_self_instruct_stops_when_the_teacher_never_follows_the_format(tmp_path):
    si = SelfInstruct(num_instructions=10, proposals_per_round=2, patience=3, answer_seed_tasks=False)
    teacher = ScriptedTeacher(lambda text, r: "I cannot help with that.")
    kept, dropped, _ = si.grow(teacher, ReplyCache(tmp_path), load_seed_tasks(), progress=False)
    assert kept == [] and dropped["unparseable_reply"] == 6 and len(teacher.asked) == 6


def test_instruction_file_task_reads_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Name a colour.", "input": "sky"}) + "\n\n")
    (tmp_path / "b.txt").write_text("Name a fruit.\n\nName a tree.\n")
    assert [p.user_text() for p in InstructionFileTask(str(tmp_path / "a.jsonl")).prompts()] == [
        "Name a colour.\n\nsky"
    ]
    assert [p.instruction for p in InstructionFileTask(str(tmp_path / "b.txt")).prompts()] == [
        "Name a fruit.",
        "Name a tree.",
    ]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        InstructionFileTask(str(tmp_path / "bad.jsonl")).prompts()
    with pytest.raises(FileNotFoundError, match=r"task\.path"):
        InstructionFileTask(str(tmp_path / "missing.jsonl")).prompts()


def test_parse_soft_label():
    labels = ["negative", "positive"]
    assert parse_soft_label("positive (70%), negative (30%)", labels) == pytest.approx(
        {"positive": 0.7, "negative": 0.3}
    )
    assert parse_soft_label("Positive (3%), positive (1%)", labels) == {"positive": 1.0}
    assert parse_soft_label("negative.", labels) == {"negative": 1.0}
    with pytest.raises(KeyError):
        parse_soft_label("mixed (50%), positive (50%)", labels)
    assert parse_soft_label("", labels) is None


def test_labelled_augmentation_keeps_parsed_soft_labels(tmp_path):
    rows = [("great film, loved it", "positive"), ("dull and far too long", "negative"),
            ("a joy from start to end", "positive"), ("the plot made no sense", "negative")]  # fmt: skip
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    replies = iter(
        [
            "Review: the acting shines but the story drags on\nSentiment: positive (60%), negative (40%)",
            "Review: a total mess\nSentiment: neutral (100%)",
            "no format at all",
            "Review: great film, loved it\nSentiment: positive (100%)",
            "**Review**: funny, warm and surprisingly\nmoving throughout\n**Sentiment**: negative (10%), positive (90%)",
        ]
    )
    task = LabelledAugmentationTask(
        str(path),
        "Classify the sentiment of this review.",
        text_type="review",
        label_type="sentiment",
        num_examples=5,
    )
    result = task.run(
        ScriptedTeacher(lambda text, r: next(replies)), ReplyCache(tmp_path / "c"), SAMPLING, False
    )
    assert result.dropped == Counter({"unknown_label": 1, "unparseable": 1, "duplicate": 1})
    assert [r.input for r in result.records] == [
        "the acting shines but the story drags on",
        "funny, warm and surprisingly moving throughout",
    ]
    assert [r.response for r in result.records] == ["positive", "positive"]
    assert json.loads(result.records[0].meta["label_probs"]) == pytest.approx(
        {"negative": 0.4, "positive": 0.6}
    )
    assert result.records[0].instruction == "Classify the sentiment of this review."


def test_reply_cache_survives_a_corrupt_entry(tmp_path):
    cache = ReplyCache(tmp_path)
    request = ChatRequest.user("hello there friend", SAMPLING)
    teacher = ScriptedTeacher(lambda text, r: "hi")
    answer_all(teacher, [request], cache, progress=False)
    key = request.key(teacher.identity())
    (tmp_path / key[:2] / f"{key}.json").write_text("{truncated")
    replies, report = answer_all(teacher, [request, request], cache, progress=False)
    assert [r.text for r in replies] == ["hi", "hi"] and report.answered == 2 and len(teacher.asked) == 2


def test_openai_teacher_reads_its_key_from_the_environment_and_sends_none_without_it(monkeypatch):
    """Without the variable no Authorization header is sent (a local server without auth); a server that wants
    a key answers 401, which names the variable (tests/test_served_teacher.py)."""
    monkeypatch.delenv("KDL_TEST_KEY", raising=False)
    keyless = OpenAITeacher("m", base_url="http://127.0.0.1:9/v1", api_key_env="KDL_TEST_KEY")
    assert "Authorization" in keyless.request_options["extra_headers"] and not keyless.has_key
    monkeypatch.setenv("KDL_TEST_KEY", "sk-test-value")
    keyed = OpenAITeacher("m", base_url="http://127.0.0.1:9/v1", api_key_env="KDL_TEST_KEY")
    assert keyed.request_options == {} and keyed.has_key
    assert public_url("https://user:secret@host.example:8443/v1?key=abc#x") == "https://host.example:8443/v1"


def test_the_shipped_smollm2_corpus_is_what_its_command_says():
    from kd_lightning.data.records import SMOLLM2_CORPUS, load_records

    records = load_records("smollm2_self_instruct")
    manifest = json.loads(SMOLLM2_CORPUS.with_suffix(".generation.json").read_text())
    assert len(records) == manifest["records"] >= 250
    assert len({r.key for r in records}) == len(records)
    sources = Counter(r.meta["source"] for r in records)
    assert sources["seed"] == len(load_seed_tasks()) and sources["self_instruct"] >= 180
    assert {r.meta["teacher_backend"] for r in records} == {"local"}
    assert {r.meta["generation_temperature"] for r in records} == {"1.0"}
    assert all(r.response.strip() for r in records)
    assert manifest["sampling"] == {
        "max_new_tokens": 160,
        "generation_temperature": 1.0,
        "top_p": 1.0,
        "top_logprobs": 0,
    }
