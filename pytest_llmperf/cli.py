"""The ``llmperf`` command: record, show, diff and prune baselines; merge reports; list models;
show and prune the checkpoint cache; A/B two environments on this node."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from . import __version__, baselines, report
from .metrics import MAIN_METRICS, METRICS, main_metric
from .results import MetricValue, Record
from .settings import KEYS_OUT_ENV, RECORD_RUN_ENV, parse_alpha, parse_fraction
from .units import format_value
from .verdict import (
    GateSettings,
    Verdict,
    base_values,
    between_run_spread,
    compare_metric,
    log_spread,
    minimum_detectable,
)

_T = TypeVar("_T")


def _argument(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse type from a parser that raises ValueError (SettingError is one): argparse
    then prints the parser's own message after the option's name."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


class CliError(Exception):
    pass


# -- models --------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    """The catalog and the project's registered models, with what they weigh per dtype, so a
    user can see what fits before a suite skips it."""
    from . import models
    from .settings import SettingError, model_registry

    pyproject = _nearest_pyproject()
    try:
        registry = model_registry(args.models_file or "", "", Path.cwd(), pyproject)
    except SettingError as exc:
        raise CliError(str(exc)) from None
    order = {"tiny": 0, "full": 1}
    specs = sorted(
        models.catalog().values(),
        key=lambda s: (not s.suite, s.task, order.get(s.tier, 2), s.family, s.param_count()),
    )
    chosen: list[tuple[str, Any]] = [(s.tier + ("" if s.suite else ", by name"), s) for s in specs]
    problems: list[str] = []
    for name in sorted(registry):
        try:
            chosen.append(("registered", models.lookup(name, registry)))
        except ValueError as exc:
            problems.append(str(exc))
    for name in args.names:
        try:
            chosen.append(("given", models.lookup(name, registry)))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.names:
        chosen = chosen[-len(args.names) :]
    rows = [
        ["name", "family", "task", "selected", "parameters"]
        + ["fp32", "bf16", "int8", "int4", "source"]
    ]
    for selected, spec in chosen:
        try:
            count = f"{spec.param_count() / 1e6:,.1f} M"
            sizes = [
                format_value(spec.weight_bytes(d), "B") for d in ("fp32", "bf16", "int8", "int4")
            ]
        except Exception as exc:  # an architecture transformers cannot build here
            count, sizes = "?", ["?"] * 4
            problems.append(f"{spec.id}: cannot count its parameters ({exc})")
        rows.append([spec.id, spec.family, spec.task, selected, count, *sizes, spec.describe()])
    print_table(rows)
    if pyproject is not None and registry:
        print(
            f"\nregistered in {_shown(pyproject)}"
            + (f" and {args.models_file}" if args.models_file else "")
        )
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _nearest_pyproject(start: Optional[Path] = None) -> Optional[Path]:
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / "pyproject.toml").is_file():
            return directory / "pyproject.toml"
    return None


def print_table(rows: list[list[str]], out: Any = None) -> None:
    out = out or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


# -- baselines record ----------------------------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> int:
    """N fresh pytest processes, each appending one run: between-run noise is what a gate needs."""
    pytest_args = [a for a in args.pytest_args if a != "--"]
    for n in range(1, args.runs + 1):
        extra = ["--llmperf-reset-baselines"] if (args.reset and n == 1) else []
        cmd = [sys.executable, "-m", "pytest", *pytest_args, "--llmperf-update-baselines", *extra]
        print(f"llmperf: recording run {n}/{args.runs}: {' '.join(cmd[2:])}", flush=True)
        # Runs 2…N append to the history run 1 started, whatever their verdict (state.py).
        env = {**os.environ, RECORD_RUN_ENV: f"{n}/{args.runs}"}
        code = subprocess.call(cmd, env=env)
        if code != 0:
            print(
                f"llmperf: run {n} exited with {code}; stopping (runs already recorded are kept)",
                file=sys.stderr,
            )
            return code
    return 0


# -- baselines show ------------------------------------------------------------------------------


def _main_metric(run: dict[str, Any]) -> Optional[str]:
    names = run.get("metrics", {})
    if any(n in names for n in MAIN_METRICS):
        return main_metric(names)
    return min(names) if names else None


def project_baselines(start: Optional[Path] = None) -> Path:
    """The baselines directory pytest would use from here: next to the nearest ini file pytest
    reads (pytest.ini, pyproject.toml with [tool.pytest…], tox.ini with [pytest], setup.cfg with
    [tool:pytest]), else in the current directory — as the plugin's default."""
    here = (start or Path.cwd()).resolve()
    markers = {
        "pytest.ini": "",
        ".pytest.ini": "",
        "pyproject.toml": "[tool.pytest",
        "tox.ini": "[pytest]",
        "setup.cfg": "[tool:pytest]",
    }
    for directory in (here, *here.parents):
        for name, marker in markers.items():
            path = directory / name
            if path.is_file():
                try:
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                if marker in text:
                    return directory / "baselines"
    return here / "baselines"


def _shown(path: Path) -> str:
    """A path as a user would type it: relative to the current directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _baseline_dir(text: Optional[str]) -> Path:
    root = Path(text) if text is not None else project_baselines()
    if not root.is_dir():
        raise CliError(f"{root}: no such baseline directory")
    return root


def cmd_show(args: argparse.Namespace) -> int:
    root = _baseline_dir(args.dir)
    files = baselines.load_dir(root)
    if not files:
        print(f"no baseline files under {root}")
        return 0
    level = GateSettings(
        alpha=args.alpha, family_alpha=args.family_alpha, comparisons=args.comparisons
    ).process_alpha
    for (device, suite), bf in sorted(files.items()):
        print(f"\n{device} / {suite}.json  ({len(bf.entries)} entries)")
        tolerance, tol_source = _show_tolerance(args.tolerance, bf.device)
        print(
            f"MDE N=n: the smallest slowdown the gate catches 90% of the time with n current "
            f"processes (--llmperf-processes) against these runs, {_level_text(args, level)}, "
            f"tolerance {tolerance:.1%} ({tol_source}); from the between-run CV for N=1, from "
            "the log sd of the run medians (what Welch's t sees) above"
        )
        rows = [
            ["entry", "runs", "outcome", "metric", "median", "between-run CV", "log sd"]
            + [f"MDE N={n}" for n in _MDE_PROCESSES]
            + ["newest"]
        ]
        for key, runs in sorted(bf.entries.items()):
            newest = runs[-1] if runs else {}
            name = _main_metric(newest)
            meds = [m for m, _ in base_values(name, runs)] if name else []
            cv = between_run_spread(meds)  # the very spread the gate uses
            sd = log_spread(meds)  # what the multi-process rule's Welch t sees
            mde = [
                minimum_detectable(cv if n == 1 else sd, len(meds), n, level, tolerance)
                for n in _MDE_PROCESSES
            ]
            rows.append(
                [
                    key,
                    str(len(runs)),
                    newest.get("outcome", "-"),
                    name or "-",
                    format_value(statistics.median(meds), METRICS[name].unit)
                    if meds and name
                    else "-",
                    f"{cv:.2%}" if cv is not None else "(1 run)",
                    f"{sd:.2%}" if sd is not None else "-",
                ]
                + [_mde_cell(m) for m in mde]
                + [str(newest.get("date", "-"))]
            )
        print_table(rows)
    return 0


#: The process counts ``baselines show`` gives the minimum detectable regression for.
_MDE_PROCESSES = (1, 4, 8, 16)


def _mde_cell(mde: Optional[float]) -> str:
    """ "+6.1%"; "-" without a spread (fewer than 2 runs); beyond a doubling the exact figure
    only says "this gate cannot see it" (Welch's t with 2 stored runs reaches +100000 %)."""
    if mde is None:
        return "-"
    return ">+100%" if mde > 1 else f"+{mde:.1%}"


def _show_tolerance(given: Optional[float], device: dict[str, Any]) -> tuple[float, str]:
    """The tolerance the gate applies to this device's entries, and where it comes from."""
    if given is not None:
        return given, "--tolerance"
    from . import backends

    name = str(device.get("backend", ""))
    try:
        return backends.get_backend(name).default_tolerance, f"the {name} backend's default"
    except KeyError:
        return GateSettings().tolerance, f"default; backend {name or '?'} is not installed"


def _level_text(args: argparse.Namespace, level: float) -> str:
    if level < args.alpha:
        return (
            f"alpha {level:.2g} per comparison (family alpha {args.family_alpha:g} / "
            f"{args.comparisons} gated comparisons)"
        )
    return f"alpha {level:g} per comparison"


# -- baselines diff ------------------------------------------------------------------------------


def _resolve_dir(text: str, repo: Path, subdir: str = "baselines") -> Path:
    if text.startswith("git:"):
        return baselines.materialize_git_rev(text[4:], subdir, repo)
    path = Path(text)
    if not path.is_dir():
        raise CliError(f"{text}: no such baseline directory (use git:REV for a git revision)")
    return path


def diff_rows(old: Path, new: Path, alpha: float = 0.01) -> list[str]:
    """Markdown lines: per entry and metric, old vs new with significance and version changes."""
    old_files = baselines.load_dir(old)
    new_files = baselines.load_dir(new)
    lines = [
        "| device / suite | entry | metric | old | new | ratio | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    changes: dict[str, set[str]] = {}
    unchanged = 0
    for where in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(where), new_files.get(where)
        label = f"{where[0]} / {where[1]}"
        keys = sorted(set(before.entries if before else {}) | set(after.entries if after else {}))
        for key in keys:
            old_runs = before.runs(key) if before else []
            new_runs = after.runs(key) if after else []
            rows, changed = _diff_entry(f"| {label} | `{key}` |", old_runs, new_runs, alpha)
            if rows is None:
                unchanged += 1
                continue
            lines += rows
            if changed:
                changes.setdefault(label, set()).update(changed)
    if unchanged:
        lines += ["", f"{unchanged} entries unchanged (no run added on the new side)."]
    if changes:
        lines += ["", "Versions that changed:"]
        for label, items in sorted(changes.items()):
            lines.append(f"- {label}: {', '.join(sorted(items))}")
    return lines


def _diff_entry(
    head: str, old_runs: list[dict[str, Any]], new_runs: list[dict[str, Any]], alpha: float
) -> tuple[Optional[list[str]], list[str]]:
    """(table rows, version changes) of one entry; rows None when the new side added nothing."""
    if not new_runs:
        return [f"{head} | | (removed) | | |"], []
    if not old_runs:
        return [f"{head} | (none) | {new_runs[-1].get('outcome')} | | added |"], []
    # Runs both sides hold are history, not change: compare what NEW added.
    known = {json.dumps(r, sort_keys=True) for r in old_runs}
    fresh = [r for r in new_runs if json.dumps(r, sort_keys=True) not in known]
    if not fresh:
        return None, []
    latest = fresh[-1]
    changed = baselines.version_changes(
        baselines.perf_versions(old_runs[-1].get("provenance", {})),
        baselines.perf_versions(latest.get("provenance", {})),
    )
    if latest.get("outcome") != "ok" or old_runs[-1].get("outcome") != "ok":
        row = f"{head} outcome | {old_runs[-1].get('outcome')} | {latest.get('outcome')} | | |"
        return [row], changed
    rows = []
    for name, m in sorted(latest.get("metrics", {}).items()):
        if name not in METRICS or m.get("median") is None:
            continue
        current = MetricValue(name, m["median"], list(m.get("samples", [])))
        mv = compare_metric(name, current, old_runs, GateSettings(alpha=alpha))
        if mv.verdict is Verdict.NO_BASELINE:
            continue
        unit = METRICS[name].unit
        ratio = f"×{mv.ratio:.3f}" if mv.ratio is not None else ""
        p = f", p={mv.p_value:.2g}" if mv.p_value is not None else ""
        gated = "" if mv.gated or mv.verdict is Verdict.PASS else " (not gated)"
        rows.append(
            f"{head} {name} | {format_value(mv.baseline, unit)} | "
            f"{format_value(mv.current, unit)} | {ratio} | {mv.verdict.value}{p}{gated} |"
        )
    return rows, changed


def cmd_diff(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    # git:REV reads, at that revision, the directory the other side names (when it is a
    # directory inside the repository), so `diff git:main my/baselines` compares like with like.
    subdir = "baselines"
    for side in (args.new, args.old):
        if not side.startswith("git:") and Path(side).is_dir():
            with contextlib.suppress(ValueError):
                subdir = Path(side).resolve().relative_to(repo.resolve()).as_posix()
            break
    old = _resolve_dir(args.old, repo, subdir)
    new = _resolve_dir(args.new, repo, subdir)
    print("\n".join(diff_rows(old, new, alpha=args.alpha)))
    return 0


# -- baselines prune -----------------------------------------------------------------------------


@dataclass
class Collected:
    """What a ``pytest --collect-only`` of the user's arguments found."""

    keys: set[tuple[str, str]]  # (suite, key) of every llmperf test, before -k/-m deselection
    suites: set[str]  # stems of every collected test file
    devices: set[str]  # device keys of this node's usable backends


def collect(pytest_args: Sequence[str]) -> Collected:
    """Collect in a subprocess, exactly as ``pytest`` would; refuse anything short of success.

    A collection that failed or found nothing proves nothing about which baselines are
    stale: pruning on it would delete every entry.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "keys.json"
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", *pytest_args]
        env = {**os.environ, KEYS_OUT_ENV: str(out)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        shown = " ".join(cmd[2:])
        if proc.returncode == 5:
            raise CliError(f"pytest collected no tests ({shown}); nothing pruned")
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip()[-2000:]
            raise CliError(
                f"collecting tests failed ({shown}, exit {proc.returncode}); nothing pruned:\n"
                + tail
            )
        data = json.loads(out.read_text())
    return Collected(
        keys={(s, k) for s, k in data["keys"]},
        suites=set(data["suites"]),
        devices=set(data["devices"]),
    )


def _split_prune_args(args: argparse.Namespace) -> list[str]:
    rest = [a for a in args.pytest_args if a != "--"]
    # `prune suites --yes` reads naturally; REMAINDER would hand --yes/--dir to pytest.
    if "--yes" in rest:
        rest.remove("--yes")
        args.yes = True
    if "--all-devices" in rest:
        rest.remove("--all-devices")
        args.all_devices = True
    for i, a in enumerate(list(rest)):
        if a == "--dir" and i + 1 < len(rest):
            args.dir = rest[i + 1]
            del rest[i : i + 2]
            break
        if a.startswith("--dir="):
            args.dir = a.split("=", 1)[1]
            rest.remove(a)
            break
    return rest


def cmd_prune(args: argparse.Namespace) -> int:
    rest = _split_prune_args(args)
    root = _baseline_dir(args.dir)
    found = collect(rest)
    if not found.keys:
        raise CliError(
            f"no llmperf test among the {len(found.suites)} collected test files "
            f"({' '.join(rest) or '.'}); nothing pruned"
        )
    live = set(found.keys)
    files = baselines.load_dir(root)
    # Named workloads ("key:name") exist only at run time; they live while their test does.
    for (_device, suite), bf in files.items():
        live |= {(suite, k) for k in bf.entries if (suite, k.split(":", 1)[0]) in live}
    only = None if args.all_devices else found.devices
    stale = baselines.prune(root, live, dry_run=not args.yes, devices=only, suites=found.suites)
    scope = "every device" if only is None else ", ".join(sorted(only)) or "no device"
    kept = sorted(
        {
            f"{device}/{suite}.json"
            for (device, suite) in files
            if suite not in found.suites and (only is None or device.split("@", 1)[0] in only)
        }
    )
    if kept:
        print(
            f"kept (their test files were not collected): {', '.join(kept)}; if a suite was "
            "deleted, remove its baseline file by hand"
        )
    if not stale:
        print(f"nothing to prune under {root} ({scope}): every entry is produced by a test")
        return 0
    per_file: dict[Path, int] = {}
    for path, _key in stale:
        per_file[path] = per_file.get(path, 0) + 1
    verb = "removed" if args.yes else "would remove"
    print(f"pruning entries of {scope} (other devices' entries are kept; --all-devices for all)")
    for path, key in stale:
        print(f"{verb}: {_shown(path)}: {key}")
    summary = ", ".join(f"{n} from {_shown(path)}" for path, n in sorted(per_file.items()))
    if args.yes:
        print(f"removed {len(stale)} stale entries: {summary}")
    else:
        print(f"{len(stale)} stale entries ({summary}); run again with --yes to remove them")
    return 0


# -- baselines accept ----------------------------------------------------------------------------


def _acceptable(row: dict[str, Any]) -> bool:
    # A test that failed for its own reason (an assertion, a crash) proves nothing; one that
    # failed only because the gate judged its numbers is exactly what accepting is for.
    return row["record"]["outcome"] in baselines.STORED_OUTCOMES and (
        row.get("test_outcome") == "passed" or bool(row.get("gate_failed"))
    )


def cmd_accept(args: argparse.Namespace) -> int:
    """Store the runs of results files (CI artifacts) as --llmperf-update-baselines would."""
    total: list[baselines.Change] = []
    errors: list[str] = []
    for name in args.results:
        data = report.load_results_file(Path(name))
        run = data.get("run") or {}
        root = _accept_root(args.dir, run)
        label = args.label or run.get("label")
        if label is not None:
            label = _label(label)
        rows = data["results"]
        ok = [row for row in rows if _acceptable(row)]
        keep = args.baseline_runs or (run.get("settings") or {}).get("baseline_runs") or 5
        changes, failed = baselines.store_records(
            root,
            [Record.from_json(row["record"]) for row in ok],
            devices=run.get("devices") or {},
            label=label,
            keep_runs=int(keep),
        )
        skipped = len(rows) - len(ok)
        print(
            f"{name}: {len(changes)} of {len(rows)} results into {root.resolve()}"
            + (f" (label {label})" if label else "")
            + (
                f"; {skipped} not accepted (error outcome, or their test failed for its own reason)"
                if skipped
                else ""
            )
        )
        for change in changes:
            print(f"  {change}")
        total += changes
        errors += failed
    for error in errors:
        print(f"llmperf: error: {error}", file=sys.stderr)
    if not total and not errors:
        print("nothing to accept")
    return 1 if errors else 0


def _accept_root(given: Optional[str], run: dict[str, Any]) -> Path:
    """--dir, else the directory the run used when it exists here (the same node), else the
    project's baselines directory as pytest would find it from here."""
    if given is not None:
        return Path(given)
    recorded = run.get("baselines")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    return project_baselines()


def _label(text: str) -> str:
    from .settings import SettingError, parse_label

    try:
        return parse_label(text)
    except SettingError as exc:
        raise CliError(f"label {text!r}: {exc}") from None


# -- ab ------------------------------------------------------------------------------------------


def cmd_ab(args: argparse.Namespace) -> int:
    """Two environments on this node in alternating fresh processes, judged per workload
    (ab.py); exit 1 when B is slower somewhere, so CI can block an upgrade on it."""
    from . import ab

    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    markdown = Path(args.markdown) if args.markdown else None
    if markdown is not None and (markdown.is_dir() or not markdown.parent.is_dir()):
        raise CliError(f"--markdown {args.markdown}: not a file in an existing directory")
    label = _label(args.label) if args.label is not None else None
    cwd = Path.cwd()
    # Each child would otherwise append its own summary to the CI step's.
    base_env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    try:
        sides = {
            name: ab.check_side(ab.resolve_side(name, given, dict(env)), base_env, cwd)
            for name, given, env in (("A", args.a, args.a_env), ("B", args.b, args.b_env))
        }
    except ab.SideError as exc:
        raise CliError(str(exc)) from None
    total = 2 * args.pairs
    print(f"llmperf ab: {total} processes, one at a time, in ABBA order", flush=True)
    start = time.monotonic()
    try:
        runs = ab.run_sides(
            sides,
            pytest_args,
            pairs=args.pairs,
            cwd=cwd,
            base_env=base_env,
            timeout=args.timeout,
            say=lambda line: print(line, flush=True),
        )
    except ab.ProcessFailed as exc:
        print(f"llmperf ab: {exc}; nothing compared or stored", file=sys.stderr)
        print(exc.run.output_tail.rstrip(), file=sys.stderr)
        return 1
    comparison = ab.compare(runs["A"], runs["B"], tolerance=args.tolerance)
    if not comparison.rows:
        raise CliError(
            f"no workload was measured by either side's {total} processes (were the tests "
            f"skipped or deselected? pytest args: {' '.join(pytest_args) or 'none'})"
        )
    print(f"llmperf ab: {total} processes in {time.monotonic() - start:.0f} s\n")
    print(ab.render_text(comparison, sides), end="")
    text = ab.render_markdown(comparison, sides)
    if markdown is not None:
        try:
            markdown.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"--markdown {args.markdown}: not written ({exc.strerror})") from None
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step and (markdown is None or Path(step).resolve() != markdown.resolve()):
        try:
            with open(step, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"llmperf: GITHUB_STEP_SUMMARY={step}: not written ({exc.strerror})")
    code = 1 if comparison.slower else 0
    if args.update_baselines_from:
        side = args.update_baselines_from.upper()
        root = Path(args.baselines) if args.baselines else project_baselines()
        records = [r for process in runs[side] for r in process]
        keep = args.baseline_runs or args.pairs
        changes, errors = baselines.store_records(
            root,
            records,
            devices=_stored_devices(root, records, label),
            label=label,
            keep_runs=keep,
        )
        print(
            f"\n{side}'s {args.pairs} runs into {root.resolve()}"
            + (f" (label {label})" if label else "")
            + f", {keep} runs kept per entry:"
        )
        for line in ab.change_lines(changes):
            print(f"  {line}")
        for error in errors:
            print(f"llmperf: error: {error}", file=sys.stderr)
        code = code or (1 if errors else 0)
    return code


def _stored_devices(
    root: Path, records: Sequence[Record], label: Optional[str]
) -> dict[str, dict[str, Any]]:
    """The device of each file already there: records alone know only a device's key and
    backend, and a file's fuller description (name, count, threads) should survive the update."""
    out: dict[str, dict[str, Any]] = {}
    for device_key, suite in {(r.device_key, r.suite) for r in records}:
        try:
            current = baselines.load(baselines.baseline_path(root, device_key, suite, label))
        except (baselines.BaselineError, ValueError):
            continue  # store_records names the corrupt file
        if current is not None and current.device.get("key") == device_key:
            out[device_key] = dict(current.device)
    return out


def _parse_env_pair(text: str) -> tuple[str, str]:
    from .ab import parse_env_pair

    return parse_env_pair(text)


_env_pair = _argument(_parse_env_pair)


def _min_effect(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1), e.g. 0.02")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _add_ab_command(sub: Any) -> None:
    abp = sub.add_parser(
        "ab",
        help="A/B two environments on this node: fresh pytest processes in ABBA order, "
        "a paired ratio B/A with its interval per workload",
        description="Run the same tests under two pythons (A the old stack, B the new one) in "
        "alternating fresh processes and judge each workload on its paired process medians. "
        "Exit 1 when a workload is slower under B (or fails there), 0 otherwise.",
    )
    side_help = "a python executable, a venv directory (its bin/python) or a wrapper script"
    abp.add_argument("--a", required=True, metavar="PYTHON_OR_VENV", help=f"side A: {side_help}")
    abp.add_argument("--b", required=True, metavar="PYTHON_OR_VENV", help=f"side B: {side_help}")
    abp.add_argument(
        "--pairs", type=_positive, default=8, help="process pairs: 2N processes (default 8)"
    )
    for side in ("a", "b"):
        abp.add_argument(
            f"--{side}-env",
            type=_env_pair,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"an environment variable for side {side.upper()}'s processes (repeatable)",
        )
    abp.add_argument(
        "--tolerance",
        type=_min_effect,
        default=0.02,
        help="minimum effect: a ratio within this fraction of 1 is no difference (default 0.02)",
    )
    abp.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    abp.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="seconds one process may run before it is killed (default: no limit)",
    )
    abp.add_argument(
        "--update-baselines-from",
        choices=("a", "b"),
        type=str.lower,
        default=None,
        help="store that side's N process runs as the baselines",
    )
    abp.add_argument("--baselines", default=None, metavar="DIR", help=_DIR_HELP)
    abp.add_argument("--label", default=None, help="store under this label")
    abp.add_argument(
        "--baseline-runs",
        type=_positive,
        default=None,
        help="runs of history kept per entry when storing (default: --pairs, all of them)",
    )
    abp.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="after --: the tests and pytest options"
    )
    abp.set_defaults(func=cmd_ab)


# -- report --------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    """The merged summary (-o or stdout), a seed-shaped table (--table) and the charts
    (--plots), from saved results.json files."""
    from . import plots

    if args.plots is not None:
        # Before any output: a report asked with plots must not half-happen without them.
        why = plots.missing()
        if why:
            raise CliError(f"--plots: plots cannot be drawn: {why}")
        if Path(args.plots).exists() and not Path(args.plots).is_dir():
            raise CliError(f"--plots {args.plots}: exists and is not a directory")
    rows: list[dict[str, Any]] = []
    for path in args.results:
        rows += report.load_results_file(Path(path))["results"]
    code = 0
    if args.table is not None:
        code = _print_table(rows, args.table, len(args.results))
    plot_lines: list[str] = []
    if args.plots is not None:
        drawn = plots.draw(rows, Path(args.plots))
        for error in drawn.errors:
            print(f"llmperf: {error}", file=sys.stderr)
        code = 1 if drawn.errors else code
        if drawn.files:
            print(f"wrote {len(drawn.files)} plots to {args.plots}")
        elif not drawn.errors:
            print(
                "no plots: these results hold no batch-size series, no encoder sequence "
                "lengths and no regressed or improved gated metric"
            )
        where = Path(args.output).resolve().parent if args.output else Path.cwd()
        plot_lines = plots.summary_lines(drawn, where)
    text = report.summary_markdown(rows, plot_lines=plot_lines)
    if args.output:
        try:
            baselines.atomic_write(Path(args.output), text)
        except OSError as exc:
            raise CliError(f"-o {args.output}: {exc}") from None
        print(f"wrote {args.output} ({len(rows)} results from {len(args.results)} files)")
    elif args.table is None and args.plots is None:
        print(text, end="")
    return code


def _print_table(rows: list[dict[str, Any]], metric: str, files: int) -> int:
    from . import tables

    known = tables.known_metrics(rows)
    if metric not in known:
        raise CliError(f"--table {metric}: unknown metric; known: {', '.join(known)}")
    table = tables.seed_table(rows, metric)
    if not table.blocks:
        measured = sorted({n for row in rows for n in (row["record"].get("metrics") or {})})
        print(
            f"llmperf: --table {metric}: no result in the {files} file"
            f"{'s' if files != 1 else ''} has {metric} "
            f"(measured: {', '.join(measured) or 'nothing'})",
            file=sys.stderr,
        )
        return 1
    print(table.text(), end="")
    return 0


# -- cache ---------------------------------------------------------------------------------------

_CACHE_KINDS = ("seeded", "partial write", "scratch", "other")


def _cache_store(args: argparse.Namespace) -> Any:
    """The store ``--cache-dir`` names, else the one the plugin would use from this shell
    (``$LLMPERF_CACHE_DIR``, ``$LLMPERF_CACHE_SIZE``, else their defaults; ini files are not
    read here)."""
    from .models.store import CheckpointStore, cache_dir_from_env, cache_size_from_env
    from .settings import SettingError

    root = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir_from_env()
    if root.exists() and not root.is_dir():
        raise CliError(f"{root}: not a directory (--cache-dir, or env LLMPERF_CACHE_DIR)")
    try:
        cap = cache_size_from_env()
    except SettingError as exc:
        raise CliError(str(exc)) from None
    return CheckpointStore(root, cap)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def cmd_cache_show(args: argparse.Namespace) -> int:
    """Where the cache is, its cap, and what it holds: what ``prune`` would weigh."""
    from .models.store import SCRATCH, SEEDED

    store = _cache_store(args)
    entries = store.entries()
    cap = store.max_bytes
    source = "env LLMPERF_CACHE_SIZE" if os.environ.get("LLMPERF_CACHE_SIZE") else "default"
    counted = sum(e.size for e in entries if e.kind != SCRATCH)
    scratch = sum(e.size for e in entries if e.kind == SCRATCH)
    print(f"cache: {store.root}")
    print(
        "cap: "
        + ("unlimited" if cap is None else format_value(cap, "B"))
        + f" ({source}; --llmperf-cache-size, env LLMPERF_CACHE_SIZE)"
    )
    print(
        f"total: {format_value(counted + scratch, 'B')} in {len(entries)} entries "
        f"({format_value(counted, 'B')} counted against the cap, "
        f"{format_value(scratch, 'B')} of scratch folders)"
    )
    if store.root.is_dir():
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(store.root).free
            print(f"free disk: {format_value(free, 'B')}")
    if not entries:
        print("nothing cached" + ("" if store.root.is_dir() else " (the directory does not exist)"))
        return 0
    print()
    rows = [["model", "dtype", "seed", "size", "last used", "kind"]]
    order = {kind: n for n, kind in enumerate(_CACHE_KINDS)}
    for e in sorted(entries, key=lambda e: (order.get(e.kind, 9), -e.last_used, e.path.name)):
        kind = e.kind if e.current else f"{e.kind}, older generator"
        if e.kind != "other" and store.in_use(e):
            kind += ", in use" if e.kind != "partial write" else ", write in progress"
        rows.append([e.model, e.dtype, e.seed, format_value(e.size, "B"), _when(e.last_used), kind])
    print_table(rows)
    if any(e.kind == SEEDED for e in entries):
        print(
            "\nseeded checkpoints are regenerated when used again; `llmperf cache prune "
            "--older-than 7d` (or --all) removes them"
        )
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """Remove regenerable data only, so it asks nothing: partial writes, scratch folders and
    older generators' checkpoints always, seeded checkpoints by age (or --all)."""
    store = _cache_store(args)
    try:
        result = store.prune(older_than=args.older_than, everything=args.all, dry_run=args.dry_run)
    except OSError as exc:
        raise CliError(str(exc)) from None
    verb = "would remove" if args.dry_run else "removed"
    for entry in result.removed:
        print(
            f"{verb}: {entry.label} ({format_value(entry.size, 'B')}, "
            f"last used {_when(entry.last_used)})"
        )
    for entry, why in result.kept:
        print(f"kept: {entry.label} ({why})")
    if not result.removed:
        print(f"nothing to prune under {store.root}")
    elif args.dry_run:
        print(
            f"would remove {len(result.removed)} entries, freeing "
            f"{format_value(result.freed, 'B')} under {store.root} (dry run: nothing removed)"
        )
    else:
        print(
            f"removed {len(result.removed)} entries, freed {format_value(result.freed, 'B')} "
            f"under {store.root}"
        )
    return 0


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhdw])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an age such as 7d, 12h or 30m (units s, m, h, d, w)"
        )
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def _cache_dir(text: str) -> str:
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a directory path")
    return text


def _add_cache_commands(csub: Any) -> None:
    where = (
        "the cache directory (default: $LLMPERF_CACHE_DIR, else ~/.cache/pytest-llmperf, as "
        "--llmperf-cache-dir)"
    )
    show = csub.add_parser("show", help="the cache's root, cap, size and entries")
    show.add_argument("--cache-dir", type=_cache_dir, default=None, help=where)
    show.set_defaults(func=cmd_cache_show)

    prune = csub.add_parser(
        "prune",
        help="remove partial writes, scratch folders and old seeded checkpoints (never the "
        "user's checkpoints, never what a running process uses)",
    )
    prune.add_argument("--cache-dir", type=_cache_dir, default=None, help=where)
    age = prune.add_mutually_exclusive_group()
    age.add_argument(
        "--older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="also seeded checkpoints unused for AGE (e.g. 7d, 12h)",
    )
    age.add_argument("--all", action="store_true", help="also every seeded checkpoint")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed")
    prune.set_defaults(func=cmd_cache_prune)


# -- entry point ---------------------------------------------------------------------------------


_alpha = _argument(parse_alpha)
_tolerance = _argument(parse_fraction)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmperf", description=__doc__)
    p.add_argument("--version", action="version", version=f"pytest-llmperf {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    models_p = sub.add_parser(
        "models",
        help="list the model catalog and the project's registered models ([tool.llmperf.models])",
    )
    models_p.add_argument(
        "names", nargs="*", help="show only these (catalog ids, registered names, directories)"
    )
    models_p.add_argument(
        "--models-file", help="a TOML/JSON registry file, as ini llmperf_models_file names"
    )
    models_p.set_defaults(func=cmd_models)

    b = sub.add_parser("baselines", help="record, show, diff, accept or prune baselines")
    _add_baselines_commands(b.add_subparsers(dest="action", required=True))

    rep = sub.add_parser(
        "report",
        help="merge results.json files into one Markdown report (stdout unless -o, --table or "
        "--plots), a seed-shaped table, plots",
    )
    rep.add_argument("results", nargs="+")
    rep.add_argument("-o", "--output", help="write the Markdown summary to this file")
    rep.add_argument(
        "--table",
        metavar="METRIC",
        help="print METRIC's medians as the seed posts' table (rows engine·dtype, columns "
        "the batch size or sequence length, oom cells), e.g. ms_per_token",
    )
    rep.add_argument(
        "--plots",
        metavar="OUTDIR",
        help="draw the charts as OUTDIR/*.png (needs matplotlib: "
        "pip install 'pytest-llmperf[plots]'); with -o the summary links them",
    )
    rep.set_defaults(func=cmd_report)

    cache = sub.add_parser("cache", help="show or prune the checkpoint cache")
    _add_cache_commands(cache.add_subparsers(dest="action", required=True))

    _add_ab_command(sub)
    return p


_DIR_HELP = "baseline directory (default: baselines/ next to the project's ini file)"


def _add_baselines_commands(bsub: Any) -> None:
    rec = bsub.add_parser(
        "record",
        help="run pytest N times in fresh processes, each appending a baseline run",
    )
    rec.add_argument("--runs", type=_positive, default=3, help="fresh pytest processes (default 3)")
    rec.add_argument("--reset", action="store_true", help="start the history afresh on run 1")
    rec.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    rec.set_defaults(func=cmd_record)

    show = bsub.add_parser(
        "show",
        help="entries, runs, between-run spread and the minimum detectable regression per device",
    )
    show.add_argument("dir", nargs="?", default=None, help=_DIR_HELP)
    show.add_argument(
        "--alpha",
        type=_alpha,
        default=0.01,
        help="significance level per comparison, as --llmperf-alpha (default 0.01)",
    )
    show.add_argument(
        "--family-alpha",
        type=_alpha,
        default=0.05,
        help="run-wide false-alarm budget, as --llmperf-family-alpha (default 0.05)",
    )
    show.add_argument(
        "--comparisons",
        type=_positive,
        default=1,
        metavar="M",
        help="gated comparisons in one run (workloads x gated metrics): each is tested at "
        "min(alpha, family-alpha / M), as the gate does (default 1)",
    )
    show.add_argument(
        "--tolerance",
        type=_tolerance,
        default=None,
        help="minimum change, as --llmperf-tolerance (default: the backend's, cpu 0.08)",
    )
    show.set_defaults(func=cmd_show)

    diff = bsub.add_parser("diff", help="compare two baseline directories or git:REV")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.add_argument("--alpha", type=_alpha, default=0.01, help="significance level (0, 0.5]")
    diff.add_argument("--repo", default=".", help="git repository for git:REV (default .)")
    diff.set_defaults(func=cmd_diff)

    prune = bsub.add_parser("prune", help="remove entries no collected test produces")
    prune.add_argument("--dir", default=None, help=_DIR_HELP)
    prune.add_argument("--yes", action="store_true", help="really remove (default: dry run)")
    prune.add_argument(
        "--all-devices",
        action="store_true",
        help="also prune devices this node does not have (their tests may not be collected here)",
    )
    prune.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest args to collect")
    prune.set_defaults(func=cmd_prune)

    acc = bsub.add_parser(
        "accept",
        help="store the runs of results.json files (e.g. CI artifacts) as "
        "--llmperf-update-baselines would have",
    )
    acc.add_argument("results", nargs="+", help="results.json files written by --llmperf-report")
    acc.add_argument(
        "--dir",
        default=None,
        help="baseline directory (default: the run's, when it exists here, else baselines/ "
        "next to the project's ini file)",
    )
    acc.add_argument("--label", default=None, help="store under this label (default: the run's)")
    acc.add_argument(
        "--baseline-runs",
        type=_positive,
        default=None,
        help="runs of history kept per entry (default: the run's setting)",
    )
    acc.set_defaults(func=cmd_accept)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, baselines.BaselineError, baselines.WriteError, report.ResultsError) as exc:
        print(f"llmperf: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `llmperf baselines show | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
