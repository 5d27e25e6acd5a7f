"""Where the pipeline's wall time goes: ``dvc repro`` in a fresh ``git clone``, stage by stage.

Clones the repository's committed HEAD into a temporary folder, optionally overrides params
(``-S key=value``, like ``dvc exp run -S``), and measures

* the whole ``dvc repro`` (wall), and each stage's wall time as DVC sees it (from its
  ``Running stage`` line to the next one: the stage process plus DVC's hashing and lock
  writing), with DVC's own time before the first stage;
* inside each stage process, from ``reports/timings/<stage>.json`` (written by every stage
  command, see ``detailfusion/timings.py``): the process start-up (interpreter + imports
  before the stage body), imports, opening and closing the MLflow run, and the stage's own
  compute, phase by phase;
* a no-op ``dvc repro`` (everything up to date) and ``dvc status``.

It writes ``bench/results/pipeline_time.json`` (or ``--out``) and prints a table. The clone's
MLflow store is its own (``sqlite:///mlflow.db`` in the clone); MLFLOW_*/DVC_* variables of the
calling shell are dropped so nothing leaks into a shared store.

    python bench/pipeline_time.py                      # default params: the real measurement
    python bench/pipeline_time.py -S synthesize.cirr.train_queries=160 ... --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNNING = re.compile(r"Running stage '([^']+)'")
# Phases that are overhead around a stage's own work (detailfusion.timings.OVERHEAD_PHASES).
OVERHEAD = ("imports", "tracking_start", "tracking_log", "tracking_end")


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``): results and hashes depend on it, not only timings
    (PyTorch picks its CPU kernels by instruction set)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> ``{"a.b": parsed value}`` (YAML scalars, as ``dvc exp run -S``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: -S {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(params: dict, overrides: dict[str, Any]) -> dict:
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise SystemExit(f"error: -S {dotted}: params.yaml has no section {key!r} there")
            node = node[key]
        if last not in node:  # added, as dvc exp run -S does (a loop's log_every, say)
            print(f"note: -S {dotted}: a new key in params.yaml", file=sys.stderr)
        node[last] = value
    return params


def clean_env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DETAILFUSION_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(clone), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               GX_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1")
    return env


def timed(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}) in {cwd}:\n"
                         f"{done.stderr[-3000:]}")
    return wall, done.stdout


def repro(clone: Path, env: dict, log: Path) -> dict[str, Any]:
    """``dvc repro`` with its output streamed: total wall and each stage's wall as DVC sees it."""
    starts: list[tuple[str, float]] = []
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            fh.write(f"{now:9.2f} {line}")
            match = RUNNING.search(line)
            if match:
                starts.append((match.group(1), now))
                print(f"[{now:7.1f} s] {match.group(1)}", file=sys.stderr, flush=True)
        proc.wait()
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"error: dvc repro failed ({proc.returncode}); see {log}")
    ends = [t for _, t in starts[1:]] + [total]
    return {
        "wall_s": round(total, 2),
        "before_first_stage_s": round(starts[0][1] if starts else total, 2),
        "stages": {name: round(end - begin, 2) for (name, begin), end in zip(starts, ends, strict=True)},
    }


def stage_rows(clone: Path, dvc_stage_wall: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for stage, dvc_wall in dvc_stage_wall.items():
        path = clone / "reports" / "timings" / f"{stage}.json"
        t = json.loads(path.read_text()) if path.is_file() else {}
        phases = t.get("phases", {})
        row = {"stage": stage, "dvc_wall_s": dvc_wall, "process_wall_s": t.get("wall_s"),
               "startup_s": t.get("startup_s"), "imports_s": round(phases.get("imports", 0.0), 2),
               "tracking_s": round(sum(phases.get(k, 0.0) for k in OVERHEAD if k != "imports"), 2),
               "compute_s": t.get("compute_s"), "phases": phases, "info": t.get("info", {})}
        if t:
            row["dvc_overhead_s"] = round(dvc_wall - t["wall_s"], 2)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["stage", "dvc_wall_s", "process_wall_s", "startup_s", "imports_s", "tracking_s", "compute_s",
            "dvc_overhead_s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for row in rows:
        lines.append(" | ".join(str(row.get(c, "")) if row.get(c) is not None else "-" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params.yaml override in the clone (repeatable), "
                    "e.g. -S stage2_branches.loop.max_steps=4")
    ap.add_argument("--repo", default=str(REPO), help="repository to clone (default: this one)")
    ap.add_argument("--rev", default="HEAD", help="revision to check out in the clone (default: HEAD)")
    ap.add_argument("--workdir", help="parent folder of the clone (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (it is removed otherwise)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline_time.json"))
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)

    parent = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pipeline-time-"))
    parent.mkdir(parents=True, exist_ok=True)
    clone = parent / "repo"
    try:
        env = clean_env(clone)
        clone_s, _ = timed(["git", "clone", "-q", args.repo, str(clone)], parent, env)
        if args.rev != "HEAD":
            timed(["git", "checkout", "-q", args.rev], clone, env)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                             text=True).stdout.strip()
        if overrides:
            params = apply_overrides(yaml.safe_load((clone / "params.yaml").read_text()), overrides)
            (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        full = repro(clone, env, parent / "repro.log")
        noop_s, noop_out = timed(["dvc", "repro"], clone, env, parent / "repro-noop.log")
        status_s, status_out = timed(["dvc", "status"], clone, env)
        rows = stage_rows(clone, full["stages"])
        result = {
            "what": "dvc repro in a fresh git clone; per stage: DVC's view vs the stage process's timings",
            "revision": rev,
            "overrides": {k: v for k, v in overrides.items()},
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "python": platform.python_version(), "platform": platform.platform()},
            "clone_s": round(clone_s, 2),
            "repro": full,
            "stages": rows,
            "totals": {k: round(sum(r.get(k) or 0.0 for r in rows), 2)
                       for k in ("startup_s", "imports_s", "tracking_s", "compute_s", "dvc_overhead_s")},
            "noop_repro_s": round(noop_s, 2),
            "noop_repro_ran_nothing": "Running stage" not in noop_out,
            "dvc_status_s": round(status_s, 2),
            "dvc_status_clean": "up to date" in status_out,
            "clone": str(clone) if args.keep else None,
        }
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\ndvc repro: {full['wall_s']} s (DVC before the first stage: {full['before_first_stage_s']} s); "
          f"no-op dvc repro: {result['noop_repro_s']} s; dvc status: {result['dvc_status_s']} s; "
          f"git clone: {result['clone_s']} s")
    print(f"totals over stages: {result['totals']}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
