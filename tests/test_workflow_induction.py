"""configs/induction.yaml: its plan (a dry run), and a shortened run of it end to end through
snakemake (a few training steps of a narrow model): training, extraction of the probe corpus per
checkpoint, and the circuits report with the real steps."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_support import ROOT, SNAKEMAKE, planned_jobs, snakemake, snakemake_cmd

pytestmark = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed in this venv")
CONFIG = ROOT / "configs" / "induction.yaml"


def local_config(workdir: Path, **train) -> Path:
    """configs/induction.yaml with its data copied into `workdir` and `train` changes."""
    cfg = yaml.safe_load(CONFIG.read_text())
    shutil.copytree(ROOT / "data" / "probes", workdir / "probes")
    cfg["corpora"]["probe"]["path"] = "probes/induction.jsonl"
    run = cfg["checkpoints"]["run"]["train"]
    run.update(tokenizer="probes/tokenizer", probes="probes/induction.jsonl", **train)
    path = workdir / "induction.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_dry_run_plans_training_every_step_and_the_circuits_report(tmp_path):
    import subprocess

    from workflow_support import env

    run = subprocess.run(snakemake_cmd(tmp_path, local_config(tmp_path), "-n", "--cores", "2"),
                         check=False, capture_output=True, text=True, timeout=120, env=env())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    jobs = planned_jobs(run.stdout)
    assert jobs["train_run"] == ["results/induction/models/run"]
    steps = [0, 250, 500, 750, 1000, 1250, 1500]
    assert sorted(jobs["extract"]) == sorted(f"results/induction/attention/probe/run-{s}/shard_000.h5" for s in steps)
    assert jobs["circuits"] == ["results/induction/circuits/probe/circuits.md"]


def test_shortened_run_reports_detectors_against_training_steps(tmp_path):
    """The rules as they run: train (2 steps of a 16-wide model), extract per checkpoint, circuits.
    Only the circuits target, so the run costs 7 jobs; the dry run above checks the whole plan."""
    config = local_config(tmp_path, steps=2, save_every=1, batch_size=4, width=16, layers=2, heads=4)
    run = snakemake(tmp_path, config, "--cores", "2", "results/induction/circuits/probe/circuits.md")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "results" / "induction"
    loss = pd.read_csv(out / "models" / "run" / "in_context_loss.csv")
    assert loss["step"].tolist() == [0, 1, 2]
    assert (loss["in_context_loss"] == loss["loss_repeat"] - loss["loss_first"]).all()
    summary = pd.read_csv(out / "circuits" / "probe" / "detector_summary.csv")
    assert sorted(summary["step"].unique()) == [0, 1, 2]
    assert set(summary["metric"]) == {"previous_token", "duplicate_token", "induction"}
    assert len(summary) == 3 * 8 * 3  # checkpoints x heads x detectors
    changes = pd.read_csv(out / "circuits" / "probe" / "head_changes.csv")
    assert len(changes) == 3 and changes["name"].str.fullmatch(r"L\d\.H\d").all()
    report = (out / "circuits" / "probe" / "circuits.md").read_text()
    assert "In-context loss" in report and "step 0" in report and "step 2" in report
    for figure in ("in_context_loss.png", "detectors.png", "changed_heads_offsets.png"):
        assert (out / "circuits" / "probe" / figure).stat().st_size > 1000
