"""Seed-shaped tables and plots: what ``llmperf report --table/--plots`` and summary.md show.

Rows are built as a run writes them (Record.to_json, verdict.judge + report.attach_history +
report.verdict_json), so the layout is checked on the data the plugin really produces. Plots
are read back from the matplotlib Figure (lines, markers, legend, scales), never from pixels.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import FAKE, read_results

from pytest_llmperf import baselines, cli, plots, report, tables, verdict
from pytest_llmperf.results import MetricValue, Record
from pytest_llmperf.state import RunState

DEVICE = "cuda-nvidia-a100-sxm4-80gb"
SUITE = "test_generation_throughput"
BATCH_SIZES = (1, 8, 16, 32, 64, 128, 256, 512)
#: Seed post 001's first table (ms/token at batch sizes 1 …), None where it ran out of memory.
SEED = {
    ("accelerate", "bf16"): [230.38, 31.78, 17.84, 10.89, None, None, None, None],
    ("deepspeed-inference", "bf16"): [44.02, 5.70, 3.01, 1.68, 1.00, 0.69, None, None],
}


def workload(engine: str, dtype: str, batch_size: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "bloom-176b",
        "engine": engine,
        "dtype": dtype,
        "engine_options": None,
        "devices": 8,
        "batch_size": batch_size,
        "new_tokens": 100,
        **extra,
    }


def generation(
    engine: str, dtype: str, batch_size: int, ms: Optional[float], note: str = ""
) -> Record:
    """A throughput record as the suite writes it; ``ms`` None: out of memory."""
    key = f"test_throughput[batch_size={batch_size},dtype={dtype},engine={engine}]"
    record = Record(
        key=key,
        suite=SUITE,
        backend="cuda",
        device_key=DEVICE,
        outcome="ok" if ms is not None else "oom",
        workload=workload(engine, dtype, batch_size),
        note=note,
        nodeid=f"suites/{SUITE}.py::{key}",
    )
    if ms is not None:
        spread = [ms * f for f in (0.98, 0.99, 1.0, 1.0, 1.01, 1.02)]
        record.metrics["ms_per_token"] = MetricValue.from_samples("ms_per_token", spread)
        e2e = [v * batch_size * 100 / 1000 for v in spread]
        record.metrics["e2e_latency_s"] = MetricValue.from_samples("e2e_latency_s", e2e)
        record.workload.update(rounds=6, prompt_tokens=7)
    return record


def row(record: Record, entry: Optional[verdict.EntryVerdict] = None) -> dict[str, Any]:
    return {
        "nodeid": record.nodeid,
        "test_outcome": "passed",
        "record": record.to_json(),
        "verdict": report.verdict_json(entry),
    }


def seed_rows(**changed: float) -> list[dict[str, Any]]:
    """The seed table as rows; ``changed`` maps "engine:batch" to a new ms/token judged
    against five stored runs of the seed's value (gate on ms_per_token)."""
    rows = []
    for (engine, dtype), values in SEED.items():
        seen_oom = False
        for bs, ms in zip(BATCH_SIZES, values):
            note = "not run: batch size of this series was out of memory" if seen_oom else ""
            seen_oom = seen_oom or ms is None
            now = changed.get(f"{engine}:{bs}", ms)
            record = generation(engine, dtype, bs, now, note)
            entry = None
            if f"{engine}:{bs}" in changed:
                runs = stored_runs(generation(engine, dtype, bs, ms))
                entry = judged(record, runs)
            rows.append(row(record, entry))
    return rows


def stored_runs(record: Record, factors: tuple[float, ...] = (1.0, 1.01, 0.99, 1.005, 0.995)):
    """Five stored runs of ``record`` (each scaled a little), as a baseline file holds them."""
    runs = []
    for day, f in enumerate(factors, 18):
        scaled = Record.from_json(record.to_json())
        for name, m in scaled.metrics.items():
            scaled.metrics[name] = MetricValue.from_samples(name, [s * f for s in m.samples])
        runs.append(baselines.record_to_run(scaled, date=f"2026-11-{day}T03:00:00Z"))
    return runs


def judged(record: Record, runs: list[dict[str, Any]]) -> verdict.EntryVerdict:
    settings = verdict.GateSettings(gate=("ms_per_token", "e2e_latency_s"))
    entry = verdict.judge(record, runs, settings)
    report.attach_history(entry, runs)
    return entry


def forward_rows() -> list[dict[str, Any]]:
    """Encoder p95 latency over sequence length (seed post 004), and ViT by image size."""
    rows = []
    for model, base in (("bert-base", 1.2e-3), ("distilbert-base", 0.7e-3)):
        for seq in (8, 16, 32, 64, 128, 256, 512):
            w = {
                "model": model,
                "engine": "transformers",
                "dtype": "fp32",
                "devices": 1,
                "batch_size": 1,
                "sequence_length": seq,
                "input_shape": [1, seq],
            }
            p95 = base * (1 + seq / 64)
            metrics = {
                "latency_p50_s": MetricValue("latency_p50_s", p95 * 0.9, [p95 * 0.9] * 5),
                "latency_p95_s": MetricValue("latency_p95_s", p95, []),
            }
            key = f"test_encoder[model={model},sequence_length={seq}]"
            record = Record(key, "test_encoder_latency", "cuda", DEVICE, "ok", metrics, workload=w)
            rows.append(row(record))
    vit = {"model": "vit-base", "engine": "transformers", "dtype": "fp32", "devices": 1}
    vit.update(batch_size=1, image_size=224)
    metrics = {"latency_p95_s": MetricValue("latency_p95_s", 4.2e-3, [])}
    record = Record("test_vit", "test_encoder_latency", "cuda", DEVICE, "ok", metrics, workload=vit)
    return rows + [row(record)]


# -- tables ----------------------------------------------------------------------------------


def test_a_batch_size_series_is_the_seed_table_with_oom_then_blank_cells():
    table = tables.seed_table(seed_rows(), "ms_per_token")
    (block,) = table.blocks
    assert block.column == "batch_size" and block.columns == list(BATCH_SIZES)
    lines = table.text().splitlines()
    assert lines[0] == (
        "ms_per_token (median, ms/token; lower is better): "
        f"{SUITE} · bloom-176b · 8 devices · new_tokens=100 · {DEVICE}"
    )
    assert lines[1].split() == ["engine", "dtype", "\\", "batch_size", *map(str, BATCH_SIZES)]
    # The first oom of a row says so; the sizes after it were never run: blank, as in the post.
    assert lines[3].split() == ["accelerate", "bf16", "230.38", "31.78", "17.84", "10.89", "oom"]
    assert lines[4].split() == ["deepspeed-inference", "bf16", "44.02", "5.70", "3.01"] + [
        "1.68",
        "1.00",
        "0.69",
        "oom",
    ]
    md = table.markdown()
    assert "| accelerate bf16 | 230.38 | 31.78 | 17.84 | 10.89 | oom |  |  |  |" in md
    assert "|:---|---:|---:|---:|---:|---:|---:|---:|---:|" in md


def test_a_cell_whose_verdict_moved_shows_its_baseline():
    rows = seed_rows(**{"deepspeed-inference:16": 3.6, "accelerate:8": 25.0})
    text = tables.seed_table(rows, "ms_per_token").text()
    assert "3.60 (was 3.01) ▲" in text  # regressed: the stored runs' center, then now
    assert "25.00 (was 31.78) ▼" in text  # improved
    assert "(was …): the baseline, shown where the verdict moved" in text
    # Unmoved cells stay plain numbers.
    assert "44.02 " in text and "(was 44.02)" not in text


def test_a_new_oom_cell_shows_what_the_baseline_measured():
    ok = generation("accelerate", "bf16", 32, 10.89)
    now = generation("accelerate", "bf16", 32, None)
    entry = judged(now, stored_runs(ok))
    assert entry.get("outcome").verdict is verdict.Verdict.NEW_OOM
    text = tables.seed_table([row(now, entry), *seed_rows()[:3]], "ms_per_token").text()
    assert "oom (was 10.89)" in text


def test_forward_rows_make_sequence_length_columns_with_a_row_per_model():
    table = tables.seed_table(forward_rows(), "latency_p95_s")
    encoders, vit = table.blocks
    assert encoders.column == "sequence_length"
    assert encoders.columns == [8, 16, 32, 64, 128, 256, 512]
    assert encoders.series == ["bert-base", "distilbert-base"]
    lines = table.text().splitlines()
    assert lines[0].startswith("latency_p95_s (ms; lower is better): test_encoder_latency")
    assert lines[1].split()[:3] == ["model", "\\", "sequence_length"]
    assert lines[3].split() == ["bert-base", "1.35", "1.50", "1.80", "2.40", "3.60", "6.00"] + [
        "10.80"
    ]
    # ViT has an image size, no sequence length: its own block, not a hole in the encoders'.
    assert vit.series == ["vit-base"] and "image_size=224" in vit.header()


def test_summary_has_tables_for_a_batch_size_series_and_for_encoders_only():
    text = report.summary_markdown(seed_rows() + forward_rows())
    assert "## Tables" in text
    assert "### ms_per_token (median, ms/token; lower is better)" in text
    assert "### latency_p95_s (ms; lower is better)" in text
    assert "## fake" not in text and f"## cuda: {DEVICE}" in text  # the existing tables stay
    # A single batch size (the latency suite) is no throughput table.
    single = [r for r in seed_rows() if r["record"]["workload"]["batch_size"] == 1]
    assert "## Tables" not in report.summary_markdown(single)


def test_history_is_kept_only_for_verdicts_that_moved():
    rows = seed_rows(**{"deepspeed-inference:16": 3.6})
    moved = next(r for r in rows if r["verdict"] is not None)
    by_metric = {m["metric"]: m for m in moved["verdict"]["metrics"]}
    history = by_metric["ms_per_token"]["history"]
    assert [h["date"][:10] for h in history] == [f"2026-11-{d}" for d in range(18, 23)]
    assert statistics.median(h["median"] for h in history) == pytest.approx(3.01, rel=1e-3)
    assert all(h["q1"] <= h["median"] <= h["q3"] for h in history)
    assert "history" not in by_metric["outcome"]  # passed: nothing kept
    assert "history" not in by_metric.get("tokens_per_s", {})


# -- plots -----------------------------------------------------------------------------------


def lines_of(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_the_throughput_chart_has_a_line_per_engine_and_oom_markers_where_they_stopped():
    (chart,) = plots.throughput_charts(seed_rows())
    fig = plots.figure(chart)
    (ax,) = fig.axes
    drawn = lines_of(ax)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["accelerate bf16", "deepspeed-inference bf16"]
    assert list(drawn["accelerate bf16"].get_xdata()) == [1, 8, 16, 32]
    assert list(drawn["accelerate bf16"].get_ydata()) == pytest.approx(
        [230.38, 31.78, 17.84, 10.89]
    )
    assert list(drawn["deepspeed-inference bf16"].get_xdata()) == [1, 8, 16, 32, 64, 128]
    ooms = {line.get_label(): line for line in ax.get_lines() if line.get_gid() == "oom"}
    assert list(ooms["_oom accelerate bf16"].get_xdata()) == [64]
    assert list(ooms["_oom deepspeed-inference bf16"].get_xdata()) == [256]
    assert ooms["_oom accelerate bf16"].get_marker() == "x"
    assert [t.get_text() for t in ax.texts] == ["oom", "oom"]
    # 1 … 512 and 0.69 … 230 ms span decades: both axes logarithmic, units on the labels.
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_ylabel() == "time per token (ms, median)"
    assert ax.get_xlabel() == "batch size (log scale)"
    assert "bloom-176b · 8 devices" in ax.get_title() and DEVICE in ax.get_title()


def test_the_encoder_chart_has_a_line_per_model_over_sequence_length():
    (chart,) = plots.encoder_charts(forward_rows())
    (ax,) = plots.figure(chart).axes
    drawn = lines_of(ax)
    assert set(drawn) == {"bert-base", "distilbert-base"}
    assert list(drawn["bert-base"].get_xdata()) == [8, 16, 32, 64, 128, 256, 512]
    assert drawn["bert-base"].get_ydata()[0] == pytest.approx(1.35)  # ms
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "p95 latency (ms)"


def test_the_history_chart_shows_the_stored_runs_this_run_and_the_baseline():
    rows = seed_rows(**{"deepspeed-inference:16": 3.6})
    charts = plots.history_charts(rows)
    assert {c.name.split("-")[1] for c in charts} == {"ms_per_token", "e2e_latency_s"}
    chart = next(c for c in charts if "ms_per_token" in c.name)
    stored = chart.lines[0]
    assert stored.y == pytest.approx([3.01 * f for f in (1.0, 1.01, 0.99, 1.005, 0.995)])
    assert all(lo <= y <= hi for lo, y, hi in zip(stored.low, stored.y, stored.high))
    assert chart.now is not None and chart.now.y == pytest.approx([3.6]) and chart.now.x == [6]
    assert chart.xticklabels == [f"2026-11-{d}" for d in range(18, 23)] + ["now"]
    (ax,) = plots.figure(chart).axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "baseline 3.01 ms/token (median of the 5 runs' medians)"
    assert "this run: 3.60 ms/token (×1.196)" in legend[-1]
    baseline = next(line for line in ax.get_lines() if line.get_label().startswith("baseline"))
    assert list(baseline.get_ydata()) == pytest.approx([3.01, 3.01], rel=1e-3)
    assert ax.get_ylabel() == "ms_per_token (ms/token)"


def test_plots_are_written_as_png_files(tmp_path):
    rows = seed_rows(**{"deepspeed-inference:16": 3.6}) + forward_rows()
    drawn = plots.draw(rows, tmp_path / "plots")
    assert drawn.errors == []
    names = sorted(p.name.split("-")[0] for _, p in drawn.files)
    assert names == ["history", "history", "latency_p95_s", "ms_per_token"]
    for _, path in drawn.files:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# -- the session's report --------------------------------------------------------------------


def finished(tmp_path: Path, rows: list[dict[str, Any]]) -> RunState:
    from pytest_llmperf.settings import resolve

    settings = resolve(cli=lambda name: None, ini=lambda key: "", inifile=None, environ={})
    run = RunState.create(settings, rootdir=tmp_path, report_dir=tmp_path / "out")
    run.rows = rows
    run.finish()
    return run


def test_session_end_writes_plots_and_summary_links_them(tmp_path):
    run = finished(tmp_path, seed_rows() + forward_rows())
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    links = [line for line in summary.splitlines() if line.startswith("![")]
    assert len(links) == 2
    for link in links:
        target = link.rsplit("](", 1)[1].rstrip(")")
        assert target.startswith("plots/") and (out / target).stat().st_size > 0
    assert "## Tables" in summary and run.report_notes == []
    assert json.loads((out / "results.json").read_text())["results"]


def test_without_matplotlib_the_summary_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = finished(tmp_path, seed_rows())
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert (
        "Plots were not drawn: matplotlib is not installed "
        "(pip install 'pytest-llmperf[plots]')." in summary
    )
    assert "## Tables" in summary and (tmp_path / "out" / "results.json").is_file()
    assert run.report_notes == [
        "plots not drawn: matplotlib is not installed (pip install 'pytest-llmperf[plots]')"
    ]
    assert run.errors == []  # a missing extra fails nothing
    assert not (tmp_path / "out" / "plots").exists()


def test_a_plot_that_fails_is_one_line_and_the_report_stays(tmp_path, monkeypatch):
    def broken(chart: plots.Chart) -> Any:
        raise ValueError("Image size of 100000x500 pixels is too large\nsecond line")

    monkeypatch.setattr(plots, "figure", broken)
    run = finished(tmp_path, seed_rows())
    (note,) = run.report_notes
    assert note.startswith("plot ms_per_token-") and note.endswith(
        "not drawn: ValueError: Image size of 100000x500 pixels is too large"
    )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- {note}" in summary and "## Tables" in summary
    assert read_results(tmp_path / "out")
    assert run.summary_lines()[-1] == f"llmperf report: {note}"


# -- the live run ----------------------------------------------------------------------------

SERIES = """
    import pytest

    @pytest.mark.parametrize("batch_size", [1, 2, 4])
    def test_tp(llmperf, batch_size):
        llmperf.generate(model="tiny-bloom", engine="fake-engine", batch_size=batch_size,
                         new_tokens=20)
"""


def test_a_live_regression_carries_its_history_into_results_and_plots(project, monkeypatch):
    project.makepyfile(test_tp=SERIES)
    project.runpytest(FAKE, "--llmperf-update-baselines").assert_outcomes(passed=3)
    monkeypatch.setenv("FAKE_SLOWDOWN", "1.2")
    result = project.runpytest(FAKE, "--llmperf-report=out", "--llmperf-confirm=0")
    result.assert_outcomes(failed=3)
    rows = read_results(project.path / "out")
    e2e = next(m for m in rows[0]["verdict"]["metrics"] if m["metric"] == "e2e_latency_s")
    (stored,) = e2e["history"]
    assert stored["median"] == pytest.approx(e2e["baseline"])
    plotted = sorted(p.name.split("-")[0] for p in (project.path / "out" / "plots").iterdir())
    assert plotted == ["history"] * 3 + ["ms_per_token"]
    summary = (project.path / "out" / "summary.md").read_text()
    assert "| engine dtype \\ batch_size | 1 | 2 | 4 |" in summary
    assert "(was " in summary and "▲" in summary
    # Without matplotlib the run still reports, says why there are no plots, fails nothing more.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = project.runpytest(FAKE, "--llmperf-report=out2", "--llmperf-no-gate")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["llmperf report: plots not drawn: matplotlib is not installed*"])
    assert "Plots were not drawn" in (project.path / "out2" / "summary.md").read_text()


def test_a_report_directory_whose_plots_path_is_a_file_is_a_start_up_error(project):
    project.makepyfile(test_tp=SERIES)
    (project.path / "out").mkdir()
    (project.path / "out" / "plots").write_text("")
    result = project.runpytest(FAKE, "--llmperf-report=out")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --llmperf-report=out: *out/plots exists and is not a directory*"]
    )
    (project.path / "file").write_text("")
    result = project.runpytest(FAKE, "--llmperf-report=file")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --llmperf-report=file: *file exists and is not a directory"]
    )


# -- llmperf report --table / --plots --------------------------------------------------------


def results_file(tmp_path: Path) -> Path:
    rows = seed_rows(**{"deepspeed-inference:16": 3.6}) + forward_rows()
    return report.write_results(tmp_path / "run", rows, {"label": None})


def test_report_table_prints_the_seed_table(tmp_path, capsys):
    code = cli.main(["report", "--table", "ms_per_token", str(results_file(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.splitlines()[3].split() == ["accelerate", "bf16", "230.38", "31.78"] + [
        "17.84",
        "10.89",
        "oom",
    ]
    assert "3.60 (was 3.01) ▲" in out
    assert "# llmperf summary" not in out  # the table alone, unless -o asks for the summary


def test_report_table_of_an_unknown_metric_lists_the_known_ones(tmp_path, capsys):
    code = cli.main(["report", "--table", "ms_per_tok", str(results_file(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("llmperf: error: --table ms_per_tok: unknown metric; known: ")
    assert "ms_per_token" in err and "latency_p95_s" in err


def test_report_table_of_a_metric_no_row_has_says_so(tmp_path, capsys):
    code = cli.main(["report", "--table", "load_time_s", str(results_file(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("llmperf: --table load_time_s: no result in the 1 file has load_time_s")


def test_report_plots_writes_the_charts_and_the_summary_links_them(tmp_path, capsys, monkeypatch):
    results = results_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["report", str(results), "--plots", "charts", "-o", "merged.md", "--table", "tpot_s"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 1  # no row has tpot_s: said, and the rest still done
    assert "no result in the 1 file has tpot_s" in err
    assert "wrote 4 plots to charts" in out and "wrote merged.md" in out
    assert len(list((tmp_path / "charts").glob("*.png"))) == 4
    merged = (tmp_path / "merged.md").read_text()
    assert "](charts/ms_per_token-" in merged and "## Tables" in merged


def test_report_plots_without_matplotlib_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    results = results_file(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = cli.main(["report", str(results), "--plots", str(tmp_path / "charts")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        "llmperf: error: --plots: plots cannot be drawn: matplotlib is not installed "
        "(pip install 'pytest-llmperf[plots]')\n"
    )
    assert not (tmp_path / "charts").exists()


def test_a_series_without_engine_options_is_labelled_by_engine_and_dtype_alone():
    # The suites parametrize engine_options=None: the record carries the text "None".
    row = {
        "record": {
            "key": "test_throughput[batch_size=1,dtype=bf16,model=tiny-bloom,new_tokens=100]",
            "workload": {"engine": "transformers", "dtype": "bf16", "engine_options": "None"},
        }
    }
    assert tables.series_label(row, tables.ENGINE_SERIES) == "transformers bf16"
    assert tables.title_parts({"engine_options": "None", "model": "m"}) == ["m"]
