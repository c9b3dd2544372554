"""Helpers shared by tests/test_workflow*.py: tiny configs, running snakemake, comparing outputs.

The reference run (configs/test.yaml run locally once) is cached per test session, so the kill,
incremental and SLURM tests compare against the same uninterrupted run without redoing it.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"
TEST_CONFIG = ROOT / "configs" / "test.yaml"
RESULTS = Path("results") / "test"  # the run name of configs/test.yaml
SKIP_DIRS = {"logs", "benchmarks"}  # timings and log lines differ from run to run

_REFERENCE: dict[str, Path] = {}


def write_config(workdir: Path, name: str = "config.yaml", **changes) -> Path:
    """configs/test.yaml with its corpus copied into `workdir` (so the run can grow it) and `changes`."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    for cname, corpus in cfg["corpora"].items():
        local = workdir / f"{cname}{Path(corpus['path']).suffix}"
        if not local.exists():
            shutil.copy(ROOT / corpus["path"], local)
        corpus["path"] = local.name  # relative to the working directory, like a user's config
    cfg.update(changes)
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict[str, str]:
    """The environment a user has after `source .venv/bin/activate` (SLURM jobs inherit PATH)."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def snakemake_cmd(workdir: Path, config: Path, *args: str, snakefile: Path | None = None) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(snakefile or ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(config), *args]


def snakemake(workdir: Path, config: Path, *args: str, timeout: float = 400,
              snakefile: Path | None = None) -> subprocess.CompletedProcess:
    """Run snakemake like a user (local profile unless args name another), with a hard time limit."""
    if not any(a.startswith("--profile") or a.startswith("--executor") for a in args):
        args = ("--profile", str(ROOT / "configs" / "profiles" / "local"), *args)
    return subprocess.run(snakemake_cmd(workdir, config, *args, snakefile=snakefile),
                          capture_output=True, text=True, timeout=timeout, env=env())


def reference_run(tmp_path_factory) -> Path:
    """Working directory of one uninterrupted local run of configs/test.yaml (once per session)."""
    if "dir" not in _REFERENCE:
        workdir = tmp_path_factory.mktemp("workflow_reference")
        run = snakemake(workdir, write_config(workdir))
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        _REFERENCE["dir"] = workdir
    return _REFERENCE["dir"]


def planned_jobs(output: str) -> dict[str, list[str]]:
    """Rule -> outputs of the jobs a dry run (-n) plans, parsed from its printed job list."""
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            jobs.setdefault(rule, [])
            continue
        m = re.match(r"^\s+output: (.*)$", line)
        if m and rule:
            jobs[rule].extend(s.strip() for s in m.group(1).split(","))
            rule = None
    return jobs


def outputs(workdir: Path) -> dict[str, Path]:
    """Relative path -> file for every result file except logs, benchmarks and hidden files (a
    killed writer's temporary file stays behind as .NAME.*.tmp; it is never taken for a result)."""
    base = workdir / RESULTS
    return {str(p.relative_to(base)): p for p in sorted(base.rglob("*"))
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(base).parts)
            and not any(part.startswith(".") for part in p.relative_to(base).parts)}


def same(x, y) -> bool:
    """Exact equality of two arrays or attribute values; NaN equals NaN (e.g. no parity figure)."""
    x, y = np.asarray(x), np.asarray(y)
    try:
        return np.array_equal(x, y, equal_nan=True)
    except TypeError:  # strings and objects have no NaN
        return np.array_equal(x, y)


def h5_differences(a: Path, b: Path) -> list[str]:
    """Every dataset and attribute of two HDF5 files compared exactly."""
    diffs: list[str] = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a: list[str] = []
        names_b: list[str] = []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if names_a != names_b:
            return [f"{a.name}: different objects"]
        for name in [""] + names_a:
            oa, ob = (fa[name], fb[name]) if name else (fa, fb)
            if set(oa.attrs) != set(ob.attrs) or any(not same(oa.attrs[k], ob.attrs[k]) for k in oa.attrs):
                diffs.append(f"{a.name}:{name or '/'} attributes differ")
            if isinstance(oa, h5py.Dataset) and not same(oa[()], ob[()]):
                diffs.append(f"{a.name}:{name} differs")
    return diffs


def output_differences(ref: Path, other: Path) -> list[str]:
    """Differences between two runs' results: HDF5 arrays, CSV tables, other files byte for byte."""
    fa, fb = outputs(ref), outputs(other)
    diffs = [f"only in one run: {k}" for k in sorted(set(fa) ^ set(fb))]
    for key in sorted(set(fa) & set(fb)):
        a, b = fa[key], fb[key]
        if key.endswith(".h5"):
            diffs += h5_differences(a, b)
        elif key.endswith(".csv"):
            try:
                pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))
            except AssertionError as exc:
                diffs.append(f"{key}: {str(exc).splitlines()[0]}")
        elif not filecmp.cmp(a, b, shallow=False):
            diffs.append(f"{key}: bytes differ")
    return diffs
