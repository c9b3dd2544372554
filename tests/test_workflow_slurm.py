"""The cluster path for real: a single-node SLURM cluster from Debian's packages (tests/slurm/up.sh,
root and apt-get needed), configs/test.yaml run through `snakemake --executor slurm` with the
project's profile, outputs compared with the local run's (HDF5 arrays, CSV tables, other files).

The cluster runs without accounting (no MariaDB/slurmdbd: lighter), so `sacct` fails; the run
passes `--slurm-status-command squeue`, without which Snakemake would wait forever (the trap in
the team's SLURM note). A hard time limit stops Snakemake with SIGINT (SIGTERM does not stop it
while it polls), and the daemons are always stopped by pid (tests/slurm/down.sh).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from workflow_support import ROOT, SNAKEMAKE, env, output_differences, reference_run, snakemake_cmd, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed in this venv")]

HERE = Path(__file__).resolve().parent / "slurm"
UP_LIMIT_S = 420  # apt-get install on a fresh CI machine, then about 15 s of daemon start
RUN_LIMIT_S = 480  # the tiny workflow is ~23 SLURM jobs of a few seconds each


def require_root_and_apt() -> None:
    """In CI (CI=true) a machine that cannot start SLURM is a failure; locally, a clear skip."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (to install and start munge/slurmctld/slurmd)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        missing.append("apt-get (Debian packages slurmctld, slurmd, slurm-client, munge)")
    if not missing:
        return
    reason = "the SLURM test needs " + " and ".join(missing)
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI must run it")
    pytest.skip(f"{reason}; it runs in CI (CI=true)")


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    require_root_and_apt()
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -r requirements.txt")
    state = tmp_path_factory.mktemp("slurm_state")
    cluster_env = {**os.environ, "SLURM_CI_STATE": str(state), "SLURM_ACCOUNTING": "none"}
    try:
        up = subprocess.run(["bash", str(HERE / "up.sh")], capture_output=True, text=True,
                            timeout=UP_LIMIT_S, env=cluster_env)
        assert up.returncode == 0, f"SLURM did not start:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
        yield state
    finally:
        subprocess.run(["bash", str(HERE / "down.sh")], capture_output=True, text=True, timeout=180,
                       env=cluster_env)


def run_with_hard_limit(cmd: list[str], limit_s: float, log: Path) -> int:
    """Run `cmd` in its own session; past `limit_s`, SIGINT it (then SIGKILL) and fail."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs and stops
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"the SLURM run passed its {limit_s} s limit:\n{log.read_text()[-3000:]}")


def test_tiny_config_on_slurm_equals_local_run(slurm_cluster, tmp_path_factory, tmp_path):
    reference = reference_run(tmp_path_factory)
    work = tmp_path / "slurm_run"
    work.mkdir()
    config = write_config(work)
    cmd = snakemake_cmd(work, config, "--executor", "slurm", "--profile", str(ROOT / "configs" / "profiles" / "slurm"),
                        "--slurm-status-command", "squeue",  # no accounting on this cluster: never sacct
                        "--slurm-init-seconds-before-status-checks", "2",  # MinJobAge 300 s >= 3 x 2 s
                        "--latency-wait", "10")
    log = tmp_path / "snakemake.log"
    rc = run_with_hard_limit(cmd, RUN_LIMIT_S, log)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    # every job but the local rule `all` went through sbatch (23 jobs: see test_workflow.py)
    assert text.count("has been submitted with SLURM jobid") == 22, text[-3000:]
    assert "slurm_logs/rule_extract/" in text
    assert output_differences(reference, work) == []
