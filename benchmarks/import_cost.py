"""What does installing pytest-llmperf cost every pytest run in the environment?

Why this script exists
----------------------
pytest imports every installed ``pytest11`` entry point on every run, so the plugin's import
cost is paid by unrelated projects that share the environment (a CI image, a developer's
venv), not only by LLM benchmarks. Three figures, measured in one run, in fresh processes,
with the repetitions interleaved so a slow minute of the machine hits all of them alike:

1. **An unrelated one-test project**: ``python -m pytest -q -p no:cacheprovider test_x.py``
   in a temporary folder (its own ``pytest.ini``, so the repository's config is not read),
   with the plugin and with ``-p no:llmperf`` (pytest then skips the entry point without
   importing it). The pairs alternate which command runs first (ABBA). The difference is the
   order-balanced trimmed mean of per-pair differences with a 95 % bootstrap interval over
   pairs (``_stats.py`` says why). Goal: ≤ 50 ms.
2. **Collecting the shipped suites**: ``python -m pytest --collect-only -q suites`` from the
   repository root, run in-process inside a fresh ``python -c`` so the script can list which
   heavy modules the collection imported. Goals: median wall time ≤ 2 s (95 % bootstrap
   interval of the median) and no ``transformers`` import.
3. **The import itself**: ``import pytest_llmperf.plugin`` in a fresh process that already
   imported pytest, as it is in a pytest run (so pytest's own import is not counted), with the
   heavy modules it pulls in; one extra ``-X importtime`` run names the imports that cost most
   and which plugin module made them: a to-do list for keeping the plugin import-light.

A verdict comes from the interval only: "goal met" when its upper bound meets the goal, "goal
missed" when its lower bound misses it, "undecided" otherwise (and below 10 repetitions). The
header gives the CPUs other processes used meanwhile (from /proc/stat). These commands are
single-threaded, so on a machine with a spare core that competition matters far less than it
does to ``overhead.py`` and every repetition is kept by default; ``--max-foreign CPUS`` drops
the repetitions with more competition (all three figures of it, so none is favoured), trying
at most 4x ``--repeats`` times. The script exits 0 whenever it could measure: it is a
measurement, not a test.

Usage
-----
    python benchmarks/import_cost.py                  # 15 repetitions of each, ~30 s
    python benchmarks/import_cost.py --repeats 40     # a tighter interval
    python benchmarks/import_cost.py --quick          # 4 repetitions: a pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from _machine import ForeignCpu
from _stats import Interval, goal_verdict, median_interval, paired_interval

REPO = Path(__file__).resolve().parent.parent
OWN = "pytest_llmperf"
PLUGIN = f"{OWN}.plugin"
#: Entry-point name in pyproject.toml: ``-p no:llmperf`` blocks it before it is imported.
ENTRY_POINT = "llmperf"
HEAVY = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "scipy",
    "numpy",
    "pytest_benchmark",
)
GOAL_DIFF_MS = 50.0
GOAL_COLLECT_S = 2.0
#: Give up after this many repetitions per one asked for, when most have competition.
MAX_TRIES = 4
#: Last line of a probe's stdout: a JSON object after this marker.
MARK = "@@import-cost "

# pytest in-process, then which modules it left imported (pytest's own output comes first).
PYTEST_PROBE = textwrap.dedent(
    f"""
    import json, sys
    import pytest
    rc = int(pytest.main(sys.argv[1:]))
    mods = {list(HEAVY) + [PLUGIN]!r}
    print({MARK!r} + json.dumps({{"rc": rc, "modules": [m for m in mods if m in sys.modules]}}))
    """
)
# The plugin's import after pytest's, timed inside the process.
IMPORT_PROBE = textwrap.dedent(
    f"""
    import json, sys, time
    import pytest
    t0 = time.perf_counter()
    import {PLUGIN}
    dt = time.perf_counter() - t0
    heavy = [m for m in {list(HEAVY)!r} if m in sys.modules]
    print({MARK!r} + json.dumps({{"seconds": dt, "modules": heavy}}))
    """
)


def clean_env() -> dict[str, str]:
    """The environment without pytest settings that would change which plugins load."""
    env = dict(os.environ)
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        env.pop(name, None)
    return env


@dataclass
class Run:
    seconds: float
    stdout: str
    stderr: str

    def probe(self) -> dict[str, Any]:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise SystemExit(f"no probe line in the output:\n{self.stdout}\n{self.stderr}")


def run(cmd: Sequence[str], cwd: Path) -> Run:
    """One fresh process, timed from the outside: interpreter start-up included, alike for all."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} (in {cwd}) exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return Run(seconds, proc.stdout, proc.stderr)


def plugin_packages() -> set[str]:
    """Top-level packages of the installed pytest11 plugins: loaded by every run anyway."""
    eps = entry_points()
    # Python 3.9's entry_points() is a dict by group; 3.10+ selects.
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    return {_top(ep.value) for ep in group} - {OWN}


def make_project(root: Path) -> Path:
    """A project that has nothing to do with LLMs: one test, its own rootdir."""
    (root / "test_x.py").write_text("def test_x():\n    assert 1\n")
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


# ----------------------------------------------------------------------------- -X importtime

_ROW = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


@dataclass
class ImportRow:
    name: str
    cumulative_ms: float
    depth: int
    parent: str = ""


def importtime_rows(stderr: str) -> list[ImportRow]:
    """Rows of ``-X importtime`` after pytest's own import, each with its importing module.

    Rows come out when an import finishes, children before their parent, one indent level
    (two spaces) per nesting level: a row's parent is the next row with a smaller depth.
    """
    rows: list[ImportRow] = []
    for line in stderr.splitlines():
        m = _ROW.match(line)
        if m:
            depth = (len(m.group(3)) - 1) // 2
            rows.append(ImportRow(m.group(4), int(m.group(2)) / 1000, depth))
    pending: list[ImportRow] = []  # rows whose parent has not been printed yet
    for row in rows:
        while pending and pending[-1].depth > row.depth:
            pending.pop().parent = row.name
        pending.append(row)
    starts = [i for i, r in enumerate(rows) if r.depth == 0 and r.name == "pytest"]
    return rows[starts[0] + 1 :] if starts else rows


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def costly_imports(rows: list[ImportRow], top: int = 6) -> list[tuple[float, str, str]]:
    """(ms, package, plugin module): other packages the plugin's modules import directly.

    Summed per package and importer (``from scipy import stats`` shows up as several rows of
    scipy's modules), most expensive first.
    """
    cost: dict[tuple[str, str], float] = {}
    for r in rows:
        if _top(r.parent) == OWN and _top(r.name) != OWN:
            key = (_top(r.name), r.parent)
            cost[key] = cost.get(key, 0.0) + r.cumulative_ms
    ranked = sorted(((ms, pkg, parent) for (pkg, parent), ms in cost.items()), reverse=True)
    return ranked[:top]


def heavy_origins(rows: list[ImportRow]) -> dict[str, str]:
    """For each heavy package imported: its import time and the plugin module that caused it.

    A package's time is the sum of its entry rows (its modules imported from outside it);
    the cause is found by walking the importers up to the first plugin module.
    """
    by_name = {r.name: r for r in rows}
    origins: dict[str, str] = {}
    for pkg in HEAVY:
        entries = [r for r in rows if _top(r.name) == pkg and _top(r.parent) != pkg]
        if not entries:
            continue
        row = entries[0]
        while row.parent and _top(row.parent) != OWN and row.parent in by_name:
            row = by_name[row.parent]
        via = row.parent if _top(row.parent) == OWN else "outside the plugin"
        through = f" (through {_top(row.name)})" if _top(row.name) != pkg else ""
        ms = sum(r.cumulative_ms for r in entries)
        origins[pkg] = f"{ms:7.1f} ms  via {via}{through}"
    return origins


# ----------------------------------------------------------------------------- main


def fmt_ms(iv: Interval) -> str:
    return f"{iv.estimate * 1000:7.1f} ms [{iv.low * 1000:.1f}, {iv.high * 1000:.1f}]"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=15, help="repetitions of each measurement")
    p.add_argument(
        "--max-foreign",
        type=float,
        metavar="CPUS",
        help="drop a repetition when other processes used more CPUs than this (default: keep)",
    )
    p.add_argument("--quick", action="store_true", help="4 repetitions: a pipeline check")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 4
    if args.repeats < 2:
        p.error("--repeats: at least 2")
    return args


@dataclass
class Measured:
    """Everything one run measured, in the order it was measured."""

    t_with: list[float] = field(default_factory=list)
    t_without: list[float] = field(default_factory=list)
    with_first: list[bool] = field(default_factory=list)
    t_collect: list[float] = field(default_factory=list)
    collect_modules: set[str] = field(default_factory=set)
    t_import: list[float] = field(default_factory=list)
    import_modules: set[str] = field(default_factory=set)
    importtime: list[ImportRow] = field(default_factory=list)
    tries: int = 0
    #: CPUs other processes used during each kept repetition.
    foreign: list[float] = field(default_factory=list)


def measure(repeats: int, max_foreign: float | None) -> Measured:
    """``repeats`` quiet repetitions, each: the with/without pair, a collection, an import."""
    py = sys.executable
    unrelated = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"]
    without = [*unrelated, "-p", f"no:{ENTRY_POINT}"]
    collect = [py, "-c", PYTEST_PROBE, "--collect-only", "-q", "suites"]
    import_probe = [py, "-c", IMPORT_PROBE]
    m = Measured()
    with tempfile.TemporaryDirectory(prefix="llmperf-import-cost-") as tmp:
        project = make_project(Path(tmp))
        # The contrast must be what it claims: the plugin loaded in one, not in the other.
        for cmd, expect in ((unrelated, True), (without, False)):
            probe = run([py, "-c", PYTEST_PROBE, *cmd[3:]], project).probe()
            if (PLUGIN in probe["modules"]) != expect:
                raise SystemExit(f"{PLUGIN} {'not ' if expect else ''}loaded by: {cmd[3:]}")
        # Warm-up: byte-code compiled, files in the page cache, for every command alike.
        for cmd in (unrelated, without):
            run(cmd, project)
        run(collect, REPO)
        run(import_probe, REPO)

        monitor = ForeignCpu(children=True)
        while len(m.with_first) < repeats and m.tries < MAX_TRIES * repeats:
            m.tries += 1
            first = len(m.with_first) % 2 == 0
            monitor.start()
            if first:
                t_with = run(unrelated, project).seconds
                t_without = run(without, project).seconds
            else:
                t_without = run(without, project).seconds
                t_with = run(unrelated, project).seconds
            c = run(collect, REPO)
            imp = run(import_probe, REPO)
            foreign = monitor.cpus()
            collected, probe = c.probe(), imp.probe()
            if collected["rc"] != 0:
                raise SystemExit(f"collecting suites failed (exit {collected['rc']}):\n{c.stdout}")
            if foreign is not None and max_foreign is not None and foreign > max_foreign:
                continue  # another process competed: the whole repetition is dropped
            if foreign is not None:
                m.foreign.append(foreign)
            m.t_with.append(t_with)
            m.t_without.append(t_without)
            m.with_first.append(first)
            m.t_collect.append(c.seconds)
            m.collect_modules.update(collected["modules"])
            m.t_import.append(probe["seconds"])
            m.import_modules.update(probe["modules"])
    # Not timed: -X importtime slows every import down.
    m.importtime = importtime_rows(run([py, "-X", "importtime", "-c", IMPORT_PROBE], REPO).stderr)
    return m


def report(m: Measured, args: argparse.Namespace) -> None:
    n = len(m.with_first)
    diff = paired_interval([w - wo for w, wo in zip(m.t_with, m.t_without)], m.with_first)
    collect = median_interval(m.t_collect)
    others = plugin_packages()
    heavy_collect = [
        name + (" (a pytest plugin of its own)" if name in others else "")
        for name in sorted(m.collect_modules - {PLUGIN})
    ]
    busy = f"{statistics.mean(m.foreign):.2f}" if m.foreign else "unknown"
    dropped = (
        f" ({m.tries - n} more dropped: other processes used > {args.max_foreign} CPUs)"
        if args.max_foreign is not None
        else ""
    )
    print(
        f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs; other "
        f"processes used {busy} CPUs on average during the repetitions kept"
    )
    print(
        f"{n} interleaved repetitions of each, fresh processes{dropped}; 95 % bootstrap "
        "intervals" + ("  [--quick: a pipeline check, not a figure]" if args.quick else "")
    )
    print()
    print("1. unrelated one-test project: python -m pytest -q -p no:cacheprovider test_x.py")
    print(f"   with the plugin        median {fmt_ms(median_interval(m.t_with))}")
    print(f"   with -p no:{ENTRY_POINT:<11} median {fmt_ms(median_interval(m.t_without))}")
    print(
        f"   difference (paired)           {fmt_ms(diff)}   goal ≤ {GOAL_DIFF_MS:.0f} ms: "
        f"{goal_verdict(diff, GOAL_DIFF_MS / 1000, n=n)}"
    )
    print()
    print("2. pytest --collect-only -q suites (repository root; pytest.main in a fresh python -c)")
    print(
        f"   wall time              median {fmt_ms(collect)}   goal ≤ {GOAL_COLLECT_S:.0f} s: "
        f"{goal_verdict(collect, GOAL_COLLECT_S, n=n)}"
    )
    print(
        f"   heavy modules imported {', '.join(heavy_collect) or 'none'}   no transformers: "
        f"{'goal missed' if 'transformers' in m.collect_modules else 'goal met'}"
    )
    print()
    print(f"3. import {PLUGIN} (pytest already imported, as in a pytest run)")
    print(f"   import time            median {fmt_ms(median_interval(m.t_import))}")
    print(f"   heavy modules imported {', '.join(sorted(m.import_modules)) or 'none'}")
    for name, origin in heavy_origins(m.importtime).items():
        print(f"     {name:<16} {origin}")
    print("   costliest imports made by plugin modules (one -X importtime run, cumulative):")
    costly = costly_imports(m.importtime)
    for ms, pkg, importer in costly:
        print(f"     {ms:7.1f} ms  {pkg:<20} imported by {importer}")
    if not costly:
        print("     none: every module they import was already loaded with pytest")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    measured = measure(args.repeats, args.max_foreign)
    if len(measured.with_first) < 2:
        print(f"no figures: {measured.tries} repetitions, all with competing processes")
        return 0
    report(measured, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
