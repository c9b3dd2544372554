"""The Snakemake workflow (Snakefile, configs/test.yaml) end to end, resumability, config errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

pytestmark = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed in this venv")


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    for corpus in cfg["corpora"].values():
        corpus["path"] = str(ROOT / corpus["path"])
    cfg.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(config), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=170)


@pytest.mark.slow
def test_tiny_run_outputs_and_second_run_does_nothing(tmp_path):
    config = write_config(tmp_path)
    run = snakemake(tmp_path, config)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "results" / "test"
    for ckpt in ("random", "minilm"):
        for shard in ("000", "001"):
            assert (out / "attention" / "tiny" / ckpt / f"shard_{shard}.h5").is_file()
        assert (out / "attention" / "tiny" / f"{ckpt}.h5").is_file()
        assert (out / "metrics" / "tiny" / f"{ckpt}.csv").is_file()
        assert (out / "figures" / "tiny" / ckpt / "tiny-000001.heads.png").is_file()
        assert (out / "figures" / "tiny" / ckpt / "tiny-000001.prepared.json").is_file()
    assert (out / "compare" / "tiny" / "checkpoint_distances.csv").is_file()
    report = (out / "report.md").read_text()
    assert "`random`, `minilm`" in report
    # every rule logged
    assert list((out / "logs").rglob("*.log"))

    import h5py

    with h5py.File(out / "attention" / "tiny" / "minilm.h5") as f:
        ids = list(f["ids"].asstr()[()])
    assert ids == [f"tiny-{i:06d}" for i in range(40)]

    again = snakemake(tmp_path, config, "-n")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


def test_config_typo_fails_naming_the_key(tmp_path):
    config = write_config(tmp_path, shard_sizee=3)
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode != 0
    assert "shard_sizee" in run.stdout + run.stderr


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"shard_size": 0}, "shard_size"),
        ({"run": "../x"}, "../x"),
        ({"corpora": {"tiny": {"path": "/nonexistent/corpus.jsonl"}}}, "corpora.tiny.path"),
        ({"checkpoints": {"bad": {"kind": "hf", "path": "/nonexistent"}}}, "checkpoints.bad.path"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, changes, needle):
    config = write_config(tmp_path, **changes)
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode != 0
    assert needle in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()
