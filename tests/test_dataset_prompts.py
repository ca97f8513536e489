"""llmperf.generate_dataset and --llmperf-prompts: the dataset experiment of reference 000.

Prompt files are parsed and refused with one line naming the file and line; each prompt is cut
to its first 16 tokens, shorter ones left-padded with exact per-row counts; exactly 50 new
tokens per row, checked every round; a round is one pass over the dataset (fake clock: exact
sums); what the model generated after the first prompts is in results.json, summary.md and the
terminal, never in a baseline. One test runs tiny-llama for real on the CPU.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import DECODE_S, PREFILL_S, FakeBackend, FakeEngine, ShortEngine, WordTokenizer
from helpers import FAKE, no_traceback, one_line_error, read_results, record_of

from pytest_llmperf import backends, engines, prompts
from pytest_llmperf.engines.base import LoadedModel
from pytest_llmperf.errors import UsageError
from pytest_llmperf.execute import ModelCache, execute
from pytest_llmperf.measure import TokenCountError
from pytest_llmperf.metrics import DEFAULT_GATED, main_metric
from pytest_llmperf.models import get as get_model
from pytest_llmperf.models.store import CheckpointStore
from pytest_llmperf.prompts import PromptFileError, read_prompts
from pytest_llmperf.runner import LLMPerf
from pytest_llmperf.runner import TestContext as Context
from pytest_llmperf.scenarios.dataset import DatasetScenario
from pytest_llmperf.spec import RecordContext, WorkloadSpec

CONTEXT = RecordContext(key="test_ds", suite="test_s", device_key="fake-chip")
#: One generate call of the fake engine after its first: prefill, then 49 decode steps.
CALL_S = PREFILL_S + 49 * DECODE_S
#: Three words, twenty words (cut to 16), sixteen words, four, five.
FIVE = (
    "the kettle clicked",
    " ".join(f"word{i}" for i in range(20)),
    " ".join(f"tok{i}" for i in range(16)),
    "why do cats purr",
    "rain again said the ferryman",
)


def dataset_spec(**changes: Any) -> WorkloadSpec:
    values: dict[str, Any] = {
        "kind": "generate_dataset",
        "model": "tiny-bloom",
        "engine": "fake-engine",
        "prompts": FIVE,
        "prompts_source": "test",
        "prompt_tokens": 16,
        "new_tokens": 50,
        "batch_size": 2,
        "rounds": 5,
        "warmup": 1,
    }
    values.update(changes)
    return WorkloadSpec(**values)


@pytest.fixture
def fake() -> FakeBackend:
    backends.register(FakeBackend, replace=True)
    engines.register(FakeEngine())
    engines.register(ShortEngine())
    return backends.get_backend("fake")


# -- prompt files ----------------------------------------------------------------------------


def test_jsonl_lines_are_strings_or_objects_with_prompt_or_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '"a plain string"\n\n{"prompt": "from prompt", "id": 7}\r\n{"text": "from text"}\n'
        '   \n"  kept as written  "\n"café 2024 — ünïcode"\n',
        encoding="utf-8",
    )
    assert read_prompts(path) == (
        "a plain string",
        "from prompt",
        "from text",
        "  kept as written  ",
        "café 2024 — ünïcode",
    )


def test_txt_files_have_one_prompt_per_non_blank_line(tmp_path):
    path = tmp_path / "p.txt"
    # A UTF-8 byte order mark (Windows editors) and U+2028 inside a line do not split prompts.
    path.write_bytes("\ufefffirst line  \n\n   \n second\u2028same line\r\nthird".encode())
    assert read_prompts(path) == ("first line", "second\u2028same line", "third")


BAD_FILES = [
    # name, content (None: not created), what the message says, the line it names
    ("missing.jsonl", None, "no such file", None),
    ("p.csv", b"a,b\n", "unknown extension '.csv'", None),
    ("noext", b"hello\n", "unknown extension '(none)'", None),
    ("empty.jsonl", b"", "no prompts", None),
    ("blank.txt", b"\n  \n\t\n", "no prompts", None),
    ("latin1.txt", b"fine\ncaf\xe9\n", "not UTF-8 text", 2),
    ("bad.jsonl", b'"ok"\n{"prompt": "unterminated}\n', "not valid JSON", 2),
    ("keys.jsonl", b'"ok"\n"ok"\n{"question": "q", "answer": "a"}\n', '"prompt" or "text"', 3),
    ("empty_prompt.jsonl", b'""\n', "empty prompt", 1),
    ("blank_prompt.jsonl", b'"x"\n{"text": "   "}\n', "empty prompt", 2),
    ("number.jsonl", b"42\n", "got a number", 1),
    ("field.jsonl", b'{"prompt": ["a", "b"]}\n', '"prompt" field is a list', 1),
]


@pytest.mark.parametrize(("name", "content", "says", "line"), BAD_FILES)
def test_a_bad_prompt_file_is_one_line_naming_the_file_and_line(
    tmp_path, name, content, says, line
):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PromptFileError) as caught:
        read_prompts(path)
    message = str(caught.value)
    assert "\n" not in message
    assert says in message
    assert message.startswith(str(path) + (f":{line}: " if line else ": "))


def test_a_directory_or_an_unreadable_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(PromptFileError, match="is a directory"):
        read_prompts(tmp_path / "dir.jsonl")
    locked = tmp_path / "locked.txt"
    locked.write_text("a prompt\n")
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == locked:  # root reads any file: refuse the read as a file mode 000 would
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(PromptFileError, match=r"locked.txt: cannot read \(Permission denied\)"):
        read_prompts(locked)


def test_the_shipped_prompts_are_varied_and_packaged():
    shipped = prompts.shipped()
    assert 30 <= len(shipped) <= 50
    assert len(set(shipped)) == len(shipped)
    assert any(not p.isascii() for p in shipped)
    assert any(any(c.isdigit() for c in p) for p in shipped)
    words = sorted(len(p.split()) for p in shipped)
    assert words[0] <= 3 and words[-1] >= 20  # some shorter than 16 tokens, most longer
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert '"data/*.jsonl"' in pyproject.read_text()  # package data: in the wheel and sdist
    assert prompts.SHIPPED_PATH.relative_to(Path(prompts.__file__).parent) == Path(
        "data/prompts.jsonl"
    )


def test_the_digest_follows_the_prompts_not_the_file():
    assert prompts.digest(["a", "b"]) == prompts.digest(("a", "b"))
    assert prompts.digest(["a", "b"]) != prompts.digest(["b", "a"])
    assert prompts.digest(["a"]).startswith("sha256:")


# -- cutting, padding, counting ---------------------------------------------------------------


def test_prompts_are_cut_to_16_tokens_and_shorter_ones_left_padded(fake):
    spec = dataset_spec()
    tokenizer = WordTokenizer()
    loaded = LoadedModel(None, tokenizer, False, "fake", 0, 0.0, "fp32")
    inputs = DatasetScenario().prepare(spec, get_model("tiny-bloom"), loaded, fake)
    assert inputs.counts == [3, 16, 16, 4, 5]
    assert [tuple(b.input_ids.shape) for b in inputs.batches] == [(2, 16), (2, 16), (1, 16)]
    first = inputs.batches[0]
    short = tokenizer("the kettle clicked")["input_ids"]
    assert first.input_ids[0].tolist() == [0] * 13 + short  # pad id 0 on the left
    assert first.attention_mask[0].tolist() == [0] * 13 + [1] * 3
    cut = tokenizer(FIVE[1])["input_ids"][:16]
    assert first.input_ids[1].tolist() == cut
    assert first.attention_mask[1].tolist() == [1] * 16
    assert tokenizer.decode(inputs.shown_ids[1]) == " ".join(f"word{i}" for i in range(16))


def test_a_round_is_one_pass_over_every_prompt_in_batches(fake):
    record = execute(dataset_spec(), CONTEXT, fake, ModelCache())
    assert record.outcome == "ok", record.note
    assert main_metric(record.metrics) == "dataset_time_s"
    assert "dataset_time_s" in DEFAULT_GATED
    # Batches of 2, 2 and 1 prompts: three generate calls per pass.
    assert record.metrics["dataset_time_s"].samples == [3 * CALL_S] * 5
    # batch_latency_s: the two full batches of each pass; the last, smaller one is left out.
    assert record.metrics["batch_latency_s"].samples == [CALL_S] * 10
    assert record.value("tokens_per_s") == 5 * 50 / (3 * CALL_S)
    assert record.value("ms_per_token") == 3 * CALL_S / (5 * 50) * 1000
    assert "ttft_s" not in record.metrics and "tpot_s" not in record.metrics
    assert "token hook" not in record.note
    assert record.workload["prompt_token_counts"] == [3, 16, 16, 4, 5]
    assert record.workload["prompt_count"] == 5
    assert record.workload["batches"] == 3
    assert record.workload["prompts_sha256"] == prompts.digest(FIVE)
    assert [g["prompt"] for g in record.generated_text] == [
        "the kettle clicked",
        " ".join(f"word{i}" for i in range(16)),
        " ".join(f"tok{i}" for i in range(16)),
    ]
    assert record.generated_text[0]["continuation"].split()[:2] == ["<5>", "<6>"]


def test_a_dataset_smaller_than_one_batch_counts_its_one_batch(fake):
    record = execute(dataset_spec(batch_size=8), CONTEXT, fake, ModelCache())
    assert record.metrics["batch_latency_s"].samples == [CALL_S] * 5


def test_every_row_must_get_exactly_new_tokens(fake):
    with pytest.raises(TokenCountError, match="round 1: generate returned 49 new tokens but 50"):
        execute(dataset_spec(engine="fake-short"), CONTEXT, fake, ModelCache())


def test_the_spec_carries_its_prompts_across_a_process_boundary():
    spec = dataset_spec()
    again = WorkloadSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec
    assert again.prompts == FIVE


def handle(backend: Any, **context: Any) -> LLMPerf:
    values = dict(
        key="test_ds",
        suite="s",
        nodeid="n",
        rounds=5,
        warmup=0,
        device_key="fake-chip",
        provenance={},
    )
    values.update(context)
    return LLMPerf(backend, Context(**values))


def test_prompts_default_to_the_option_then_to_the_shipped_file(fake):
    shipped = handle(fake).generate_dataset(
        model="tiny-bloom", engine="fake-engine", batch_size=8, max_prompts=9
    )
    assert shipped.workload["prompts"] == f"{prompts.SHIPPED_SOURCE} (first 9 of 41)"
    assert shipped.workload["prompts_sha256"] == prompts.digest(prompts.shipped()[:9])
    own = handle(fake, prompts=FIVE, prompts_source="/data/p.txt").generate_dataset(
        model="tiny-bloom", engine="fake-engine"
    )
    assert own.workload["prompts"] == "/data/p.txt"
    assert own.workload["prompt_count"] == 5
    given = handle(fake, prompts=FIVE).generate_dataset(
        model="tiny-bloom", engine="fake-engine", prompts=["one prompt"]
    )
    assert given.workload["prompts"] == prompts.ARGUMENT_SOURCE
    assert given.workload["prompt_token_counts"] == [2]


@pytest.mark.parametrize(
    ("argument", "says"),
    [
        ("a single string", re.escape("got one str (for a single prompt: prompts=[text])")),
        ([], "expected at least one prompt"),
        (["ok", 3], r"prompts=\.\.\.\)\[1\]: expected a string, got int"),
        (["ok", " "], r"\[1\]: empty prompt"),
    ],
)
def test_bad_prompts_in_code_are_usage_errors_naming_the_item(fake, argument, says):
    with pytest.raises(UsageError, match=says):
        handle(fake).generate_dataset(model="tiny-bloom", engine="fake-engine", prompts=argument)


def test_a_context_too_short_for_16_plus_50_tokens_is_a_usage_error(fake):
    with pytest.raises(UsageError, match=r"llmperf.generate_dataset\(model='tiny-gpt2'\)"):
        handle(fake).generate_dataset(
            model="tiny-gpt2", engine="fake-engine", prompts=["x"], new_tokens=1020
        )


def test_tiny_llama_for_real_cuts_pads_and_decodes(tmp_path):
    """The offline tokenizer and a seeded tiny-llama on the CPU: every row gets exactly 50
    tokens, counts are the tokenizer's (at most 16), and the shown prompts decode to the cut
    text."""
    from pytest_llmperf.models import build_tokenizer

    texts = (prompts.shipped()[0], prompts.shipped()[3], prompts.shipped()[1])
    spec = dataset_spec(
        model="tiny-llama", engine="transformers", dtype="fp32", prompts=texts, rounds=1, warmup=0
    )
    cache = ModelCache(store=CheckpointStore(tmp_path))
    record = execute(spec, CONTEXT, backends.get_backend("cpu"), cache)
    cache.drop()
    assert record.outcome == "ok", record.note
    tokenizer, real = build_tokenizer(get_model("tiny-llama"))
    assert not real
    ids = [tokenizer(t)["input_ids"][:16] for t in texts]
    assert record.workload["prompt_token_counts"] == [len(i) for i in ids]
    assert min(record.workload["prompt_token_counts"]) < 16  # padding was needed
    assert len(record.output_head) == 50
    assert [g["prompt"] for g in record.generated_text] == [
        tokenizer.decode(i, skip_special_tokens=True) for i in ids
    ]
    assert all(g["continuation"] for g in record.generated_text)


# -- end to end: the option, the report, the baseline -----------------------------------------

DATASET_TEST = """
    def test_ds(llmperf):
        llmperf.generate_dataset(model="tiny-bloom", engine="fake-engine", batch_size=2)
"""


def test_the_option_runs_a_projects_own_prompt_file_end_to_end(project):
    (project.path / "prompts.txt").write_text(
        "Sourdough starter is flour and water | left *to* ferment\n\n"
        "Three lighthouses guard this stretch of coast and two more\n"
        "Ok\n"
        "A fourth prompt nobody sees in the report\n",
        encoding="utf-8",
    )
    project.makepyfile(test_ds=DATASET_TEST)
    args = (FAKE, "--llmperf-prompts=prompts.txt", "--llmperf-report=out", "--llmperf-rounds=5")
    result = project.runpytest(*args, "--llmperf-update-baselines")
    result.assert_outcomes(passed=1)
    no_traceback(result)
    # The terminal: the prompts as cut, each with what was generated, one line each.
    result.stdout.fnmatch_lines(
        [
            "notes:",
            "  test_ds*",
            '    "Sourdough starter is flour and water | left [*]to[*] ferment" -> "<5> <6> <7>*',
        ]
    )
    record = record_of(read_results(project.path / "out"), "test_ds")
    assert record["workload"]["prompts"] == str(project.path / "prompts.txt")
    assert record["workload"]["prompt_count"] == 4
    assert record["workload"]["prompt_token_counts"] == [10, 10, 1, 8]
    assert record["metrics"]["dataset_time_s"]["samples"] == [2 * CALL_S] * 5
    shown = [g["prompt"] for g in record["generated_text"]]
    assert shown == [
        "Sourdough starter is flour and water | left *to* ferment",
        "Three lighthouses guard this stretch of coast and two more",
        "Ok",
    ]
    summary = (project.path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "### Generated text" in summary
    # Markdown specials in a prompt are shown as text, not as formatting or a table cell.
    assert (
        "1. **Sourdough starter is flour and water \\| left \\*to\\* ferment** \\<5\\> \\<6\\>"
        in summary
    )
    assert "nobody sees" not in summary
    stored = (project.path / "baselines" / "fake-chip" / "test_ds.json").read_text()
    assert json.loads(stored)["entries"]["test_ds"]["runs"][0]["metrics"]["dataset_time_s"]
    assert "generated_text" not in stored and "Sourdough" not in stored
    # The next run is judged on the pass time (gated by default) against that baseline.
    project.runpytest(*args).assert_outcomes(passed=1)
    verdict = read_results(project.path / "out")[0]["verdict"]
    judged = {m["metric"]: m for m in verdict["metrics"]}
    assert judged["dataset_time_s"]["gated"] and judged["dataset_time_s"]["verdict"] == "pass"


def test_a_child_process_measures_the_same_dataset(project, monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(project.path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("LLMPERF_WORKER_IMPORTS", "conftest")
    (project.path / "p.jsonl").write_text('"one two three"\n{"text": "four five"}\n"six"\n')
    project.makepyfile(test_ds=DATASET_TEST)
    args = (FAKE, "--llmperf-prompts=p.jsonl", "--llmperf-rounds=5")
    project.runpytest(*args, "--llmperf-report=a").assert_outcomes(passed=1)
    project.runpytest(*args, "--llmperf-report=b", "--llmperf-launcher=process").assert_outcomes(
        passed=1
    )
    inline = record_of(read_results(project.path / "a"), "test_ds")
    child = record_of(read_results(project.path / "b"), "test_ds")
    for field in ("generated_text", "output_digest"):
        assert child[field] == inline[field]
    for name in ("dataset_time_s", "batch_latency_s"):
        assert child["metrics"][name]["samples"] == inline["metrics"][name]["samples"]
    assert child["workload"]["prompts_sha256"] == inline["workload"]["prompts_sha256"]


def test_a_bad_prompt_file_stops_the_run_naming_option_file_and_line(project, monkeypatch):
    (project.path / "bad.jsonl").write_text('"fine"\n{"question": "no prompt here"}\n')
    project.makepyfile(test_ds=DATASET_TEST)
    line = one_line_error(project.runpytest(FAKE, "--llmperf-prompts=bad.jsonl"))
    assert line == (
        f"ERROR: --llmperf-prompts=bad.jsonl: {project.path / 'bad.jsonl'}:2: an object without "
        'a "prompt" or "text" field (its keys: \'question\')'
    )
    monkeypatch.setenv("LLMPERF_PROMPTS", "absent.txt")
    line = one_line_error(project.runpytest(FAKE))
    assert (
        line
        == f"ERROR: env LLMPERF_PROMPTS=absent.txt: {project.path / 'absent.txt'}: no such file"
    )


def test_a_relative_ini_value_is_read_from_the_ini_files_directory(project, monkeypatch):
    """The ini's path from the ini file's directory, the command line's from where pytest
    was started (here a subdirectory), as for the other path options."""
    (project.path / "data").mkdir()
    (project.path / "data" / "p.txt").write_text("from the ini\n")
    (project.path / "sub").mkdir()
    (project.path / "sub" / "p.txt").write_text("from the command line\n")
    project.makeini("[pytest]\nllmperf_prompts = data/p.txt\n")
    project.makepyfile(test_ds=DATASET_TEST)
    monkeypatch.chdir(project.path / "sub")
    project.runpytest(FAKE, "../test_ds.py", "--llmperf-report=../r").assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "r"), "test_ds")
    assert record["workload"]["prompts"] == str(project.path / "data" / "p.txt")
    args = (FAKE, "../test_ds.py", "--llmperf-report=../r", "--llmperf-prompts=p.txt")
    project.runpytest(*args).assert_outcomes(passed=1)
    record = record_of(read_results(project.path / "r"), "test_ds")
    assert record["generated_text"][0]["prompt"] == "from the command line"
    project.makeini("[pytest]\nllmperf_prompts = data/missing.jsonl\n")
    line = one_line_error(project.runpytest(FAKE, "../test_ds.py"))
    assert line.startswith("ERROR: ini llmperf_prompts=data/missing.jsonl in ")
    assert line.endswith(f"{project.path / 'data' / 'missing.jsonl'}: no such file")


def test_the_suite_names_its_dataset_in_the_baseline_key(project):
    suite = Path(__file__).resolve().parents[1] / "suites" / "test_dataset_generation.py"
    project.makepyfile(test_dataset_generation=suite.read_text())
    (project.path / "p.txt").write_text("a prompt of our own\n")
    collected = project.runpytest(FAKE, "--llmperf-models=tiny", "--collect-only", "-q")
    shipped = prompts.digest(prompts.shipped()).split(":")[1][:16]
    assert "tiny-llama" in collected.stdout.str()
    assert shipped in collected.stdout.str()
    own = prompts.digest(["a prompt of our own"]).split(":")[1][:16]
    args = (FAKE, "--llmperf-models=tiny", "--collect-only", "-q", "--llmperf-prompts=p.txt")
    assert own in project.runpytest(*args).stdout.str()
