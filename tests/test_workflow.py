"""The Snakemake workflow (Snakefile, configs/test.yaml) end to end: outputs, agreement with the CLIs
run by hand, resumability after a kill, incremental runs, the lint, and config errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from attnpipe import store
from attnpipe.extract.loading import default_model_dir
from workflow_support import (
    RESULTS,
    ROOT,
    SNAKEMAKE,
    env,
    output_differences,
    outputs,
    planned_jobs,
    reference_run,
    snakemake,
    snakemake_cmd,
    write_config,
)

pytestmark = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed in this venv")


@pytest.fixture
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run's working directory (mtimes and Snakemake's metadata kept)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("locks", "log"))
    return dst


def attention_arrays(path: Path) -> dict[str, np.ndarray]:
    """id -> stored attention, through the reader (the workflow writes schema version 3)."""
    with store.open_attention(path) as f:
        return {text_id: f[i].attention for i, text_id in enumerate(f.ids)}


@pytest.mark.slow
def test_tiny_run_outputs_and_second_run_does_nothing(reference):
    out = reference / RESULTS
    for ckpt in ("random", "minilm"):
        for shard in ("000", "001"):
            assert (out / "attention" / "tiny" / ckpt / f"shard_{shard}.h5").is_file()
        assert (out / "attention" / "tiny" / f"{ckpt}.h5").is_file()
        assert (out / "metrics" / "tiny" / f"{ckpt}.csv").is_file()
        assert (out / "figures" / "tiny" / ckpt / "line-2.heads.png").is_file()
        assert (out / "figures" / "tiny" / ckpt / "line-2.prepared.json").is_file()
    assert (out / "compare" / "tiny" / "checkpoint_distances.csv").is_file()
    report = (out / "report.md").read_text()
    assert "`random`, `minilm`" in report
    assert list((out / "logs").rglob("*.log"))  # every rule logged

    with store.open_attention(out / "attention" / "tiny" / "minilm.h5") as f:
        assert f.meta.schema_version == store.H5_SCHEMA_VERSION  # the workflow writes the default layout
        ids = list(f.ids)
    assert ids == [f"line-{i}" for i in range(1, 41)]  # attnpipe.extract.corpus: line numbers

    again = snakemake(reference, reference / "config.yaml", "-n")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_moved_checkout_reruns_nothing(reference, tmp_path):
    """Params and shell text hold no absolute interpreter or checkout path: a copy of the code
    (another checkout) finds the same run up to date."""
    code = tmp_path / "moved"
    code.mkdir()
    for name in ("Snakefile", "extract_attention.py", "visualize_attention.py", "analyze_attention.py"):
        shutil.copy(ROOT / name, code / name)
    for name in ("scripts", "configs", "workflow", "attnpipe"):
        shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    run = snakemake(reference, reference / "config.yaml", "-n", snakefile=code / "Snakefile")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]


@pytest.mark.slow
def test_workflow_file_equals_the_cli_run_by_hand(reference, tmp_path):
    """extract_attention.py typed by hand with the flags of configs/test.yaml gives the same arrays."""
    shard = reference / RESULTS / "shards" / "tiny" / "shard_001.jsonl"
    by_hand = tmp_path / "by_hand.h5"
    cmd = [cli_python(), str(ROOT / "extract_attention.py"),
           "--texts-file", str(shard), "--model_dir", str(reference / RESULTS / "models" / "random"),
           "--max-length", "32", "--dtype", "float32", "--batch-size", "20", "--device", "cpu",
           "--output_file", str(by_hand)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert run.returncode == 0, run.stderr
    ours = attention_arrays(reference / RESULTS / "attention" / "tiny" / "random" / "shard_001.h5")
    hand = attention_arrays(by_hand)
    assert list(ours) == list(hand) == [f"line-{i}" for i in range(21, 41)]
    for text_id in ours:
        np.testing.assert_array_equal(ours[text_id], hand[text_id])


def cli_python() -> str:
    return str(Path(env()["PATH"].split(os.pathsep)[0]) / "python")


@pytest.mark.slow
def test_corpus_file_gives_the_same_ids_and_arrays_through_the_cli_and_the_workflow(tmp_path):
    """One corpus file, read by extract_attention.py and by the workflow (split into shards by
    scripts/split_corpus.py, extracted, merged): the same ids and the same arrays. A .txt file with
    a blank line and a U+2028 inside a text: line numbers and line breaks are the corpus reader's."""
    (tmp_path / "small.txt").write_text("The cat sat.\n\nA dog\u2028barked twice.\nBirds sing.\n",
                                        encoding="utf-8")
    config = write_config(tmp_path, corpora={"small": {"path": "small.txt"}},
                          checkpoints={"minilm": {"kind": "hf", "path": "default"}},
                          figures={"texts": ["line-3"], "layer": -1})
    target = "results/test/attention/small/minilm.h5"
    run = snakemake(tmp_path, config, target)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    by_hand = tmp_path / "by_hand.h5"
    cmd = [cli_python(), str(ROOT / "extract_attention.py"), "--texts-file", str(tmp_path / "small.txt"),
           "--max-length", "32", "--dtype", "float32", "--batch-size", "20", "--device", "cpu",
           "--output_file", str(by_hand)]
    cli = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert cli.returncode == 0, cli.stderr
    ours, hand = attention_arrays(tmp_path / target), attention_arrays(by_hand)
    assert list(ours) == list(hand) == ["line-1", "line-3", "line-4"]
    for text_id in ours:
        np.testing.assert_array_equal(ours[text_id], hand[text_id])
    with store.open_attention(tmp_path / target) as f, store.open_attention(by_hand) as g:
        assert [t.text for t in f] == [t.text for t in g] == ["The cat sat.", "A dog\u2028barked twice.", "Birds sing."]


@pytest.mark.slow
def test_killed_run_resumes_with_rerun_incomplete(reference, tmp_path):
    """SIGKILL the whole run (snakemake and its jobs) once some extraction files exist; after
    --unlock, the local profile's --rerun-incomplete finishes it: outputs equal the uninterrupted
    run's and files finished before the kill are not redone."""
    config = write_config(tmp_path)
    cmd = snakemake_cmd(tmp_path, config, "--profile", str(ROOT / "configs" / "profiles" / "local"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    attention = tmp_path / RESULTS / "attention" / "tiny"
    deadline = time.monotonic() + 300
    try:
        while len(list(attention.glob("*/shard_*.h5"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no extraction output within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the job it is running
        proc.wait()
    at_kill = {k: p.stat().st_mtime_ns for k, p in outputs(tmp_path).items()}
    assert "report.md" not in at_kill

    unlock = snakemake(tmp_path, config, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    # What the resumed run will do: jobs never started, and jobs Snakemake had not recorded as
    # finished (their output may already be in place: the job had not exited yet).
    dry = snakemake(tmp_path, config, "-n")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    planned = [o.removeprefix(f"{RESULTS}/") for outs in planned_jobs(dry.stdout).values() for o in outs]
    finished = {k: t for k, t in at_kill.items()
                if not any(k == p or k.startswith(p + "/") for p in planned)}
    extracted = [k for k in finished if k.startswith("attention/tiny/") and k.count("/") == 3]
    assert 1 <= len(extracted) < 4, extracted  # mid-way: some, not all, extraction jobs finished

    resumed = snakemake(tmp_path, config)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = outputs(tmp_path)
    redone = [k for k, t in finished.items() if after[k].stat().st_mtime_ns != t]
    assert redone == [], f"finished before the kill but redone: {redone}"
    assert output_differences(reference, tmp_path) == []


@pytest.mark.slow
def test_adding_a_shard_schedules_only_its_jobs(reference, tmp_path):
    work = copy_run(reference, tmp_path / "run")
    corpus = work / "tiny.jsonl"
    more = [json.dumps({"text": f"An added text number {i}, written later.", "label": "pos"}) for i in range(10)]
    corpus.write_text(corpus.read_text() + "\n".join(more) + "\n")  # 40 -> 50 texts: shard 002 appears
    dry = snakemake(work, work / "config.yaml", "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = planned_jobs(dry.stdout)
    shard2 = "results/test/attention/tiny/{}/shard_002.h5"
    assert sorted(jobs["extract"]) == sorted([shard2.format("random"), shard2.format("minilm")])
    assert jobs["split_corpus"] == ["results/test/shards/tiny/shard_002.jsonl"]
    assert len(jobs["metrics"]) == 2 and all("shard_002" in o for o in jobs["metrics"])
    assert "random_init" not in jobs
    # the merges, comparison and report follow from the new shard; nothing else runs
    assert set(jobs) == {"split_corpus", "extract", "metrics", "merge_attention", "merge_metrics",
                         "figure_heads", "prepare", "compare", "corpus_report", "report", "all"}


@pytest.mark.slow
def test_adding_a_state_dict_checkpoint_runs_only_it(reference, tmp_path):
    """A raw state dict (here MiniLM's own weights, in .safetensors) added as a checkpoint: only its
    jobs are planned, and its attention equals the packaged MiniLM's bit for bit."""
    import torch
    import transformers
    from safetensors.torch import save_file

    work = copy_run(reference, tmp_path / "run")
    sd = transformers.AutoModel.from_pretrained(default_model_dir()).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, work / "minilm_weights.safetensors")
    torch.save(sd, work / "minilm_weights.pt")
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["checkpoints"]["sd"] = {"kind": "state_dict", "path": "minilm_weights.safetensors", "base": "default"}
    cfg["checkpoints"]["sdpt"] = {"kind": "state_dict", "path": "minilm_weights.pt"}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    dry = snakemake(work, work / "config.yaml", "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = planned_jobs(dry.stdout)
    assert sorted(jobs["state_dict"]) == ["results/test/models/sd", "results/test/models/sdpt"]
    assert sorted(jobs["extract"]) == sorted(f"results/test/attention/tiny/{c}/shard_{s}.h5"
                                             for c in ("sd", "sdpt") for s in ("000", "001"))
    assert "random_init" not in jobs and "split_corpus" not in jobs

    targets = [f"results/test/attention/tiny/{c}/shard_000.h5" for c in ("sd", "sdpt")]
    run = snakemake(work, work / "config.yaml", *targets)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    minilm = attention_arrays(work / RESULTS / "attention" / "tiny" / "minilm" / "shard_000.h5")
    for target in targets:
        got = attention_arrays(work / target)
        assert list(got) == list(minilm)
        for text_id in got:
            np.testing.assert_array_equal(got[text_id], minilm[text_id])


def test_gpu_profile_extracts_with_cuda(tmp_path):
    """configs/profiles/slurm-gpu gives extract jobs a GPU and --device cuda (dry run: no cluster)."""
    config = write_config(tmp_path)
    run = snakemake(tmp_path, config, "--profile", str(ROOT / "configs" / "profiles" / "slurm-gpu"),
                    "-n", "-p", "results/test/attention/tiny/minilm/shard_000.h5")
    assert run.returncode == 0, run.stderr[-3000:]
    extract = [line for line in run.stdout.splitlines() if "extract_attention.py" in line]
    assert extract and all("--device cuda" in line for line in extract)
    assert "gpu=1" in run.stdout
    cpu = snakemake(tmp_path, config, "-n", "-p", "results/test/attention/tiny/minilm/shard_000.h5")
    assert "--device cpu" in cpu.stdout and "--device cuda" not in cpu.stdout


def test_demo_config_dry_run(tmp_path):
    (tmp_path / "data").symlink_to(ROOT / "data")
    run = snakemake(tmp_path, ROOT / "configs" / "demo.yaml", "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    # 277 texts / 100 per shard = 3 shards; random, minilm, ft-10, ft-20 = 4 checkpoints
    assert len(jobs["extract"]) == 12
    assert len(jobs["finetune"]) == 1 and len(jobs["random_init"]) == 1
    assert jobs["report"] == ["results/demo/report.md"]


# Lints kept on purpose (README, "Workflow"): the rules run in the project's venv, not per-rule
# conda/containers; the interpreter and checkout are {PY}/{BASE} in shell text, not params, so
# that moving the checkout does not rerun everything.
ALLOWED_LINTS = (
    "Specify a conda environment or container for each rule.",
    "Shell command directly uses variable PY from outside of the rule",
    "Shell command directly uses variable BASE from outside of the rule",
)


def test_lint_reports_only_the_documented_lints(tmp_path):
    run = subprocess.run([str(SNAKEMAKE), "--lint", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(write_config(tmp_path))],
                         capture_output=True, text=True, timeout=120, env=env())
    text = run.stdout + run.stderr
    lints = {line.strip()[2:].rstrip(":") for line in text.splitlines() if line.startswith("    * ")}
    assert lints, text[-2000:]  # the lint ran and found the expected ones
    assert lints <= {lint.rstrip(":") for lint in ALLOWED_LINTS}, lints - set(ALLOWED_LINTS)
    assert "Lints for snakefile" not in text  # no workflow-level lints


def test_config_typo_fails_naming_the_key(tmp_path):
    config = write_config(tmp_path, shard_sizee=3)
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode != 0
    assert "shard_sizee" in run.stdout + run.stderr


class NotATensor:
    """Pickled into a .pt file: torch.load(weights_only=True) must refuse it."""


def _bad_state_dict(tmp_path: Path, kind: str) -> str:
    import torch
    from safetensors.torch import save_file

    if kind == "wrong_shape":
        save_file({"embeddings.word_embeddings.weight": torch.zeros(10, 4)}, tmp_path / "w.safetensors")
        return "w.safetensors"
    if kind == "wrong_shape_pt":
        from safetensors.torch import load_file

        sd = load_file(default_model_dir() / "model.safetensors")
        sd["encoder.layer.0.attention.self.query.weight"] = torch.zeros(8, 384)
        torch.save(sd, tmp_path / "w.pt")
        return "w.pt"
    torch.save({"w": NotATensor()}, tmp_path / "w.pt")
    return "w.pt"


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"shard_size": 0}, "shard_size"),
        ({"run": "../x"}, "../x"),
        ({"corpora": {"tiny": {"path": "/nonexistent/corpus.jsonl"}}}, "corpora.tiny.path: file not found"),
        ({"corpora": {"../x": {"path": "tiny.jsonl"}}}, "../x"),
        ({"checkpoints": {"../x": {"kind": "hf", "path": "default"}}}, "../x"),
        ({"checkpoints": {"bad": {"kind": "hf", "path": "/nonexistent"}}}, "checkpoints.bad.path"),
        ({"checkpoints": {"bad": {"kind": "hf", "path": "EMPTY_MODEL"}}}, "is not a model folder with weights"),
        ({"checkpoints": {"sd": {"kind": "state_dict", "path": "nope.safetensors"}}},
         "checkpoints.sd.path: file not found"),
        ({"checkpoints": {"sd": {"kind": "state_dict", "path": "SD:wrong_shape"}}}, "does not fit base"),
        ({"checkpoints": {"sd": {"kind": "state_dict", "path": "SD:wrong_shape_pt"}}}, "has shape [8, 384]"),
        ({"checkpoints": {"sd": {"kind": "state_dict", "path": "SD:pickled_code"}}}, "weights_only=True"),
        ({"checkpoints": {"ft-10": {"kind": "hf", "path": "default"},
                          "ft": {"kind": "run", "path": "RUN"}}}, "'ft-10' is used twice"),
        ({"corpora": {"dup": {"path": "DUP_IDS"}}}, "corpora.dup.path: dup.jsonl has 3 problems: line 3 repeats "
         "text id 'a' (first on line 1); line 5 repeats text id 'b' (first on line 2); line 6 repeats text id 'a'"),
        # the corpus reader's checks (the CLI's), before any job: here a .txt that is not UTF-8
        ({"corpora": {"bad": {"path": "BAD_UTF8"}}}, "corpora.bad.path: bad.txt line 2 is not valid UTF-8"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, changes, needle):
    for spec in changes.get("checkpoints", {}).values():
        if spec.get("path") == "EMPTY_MODEL":  # a folder with a config but no weights
            (tmp_path / "empty").mkdir()
            shutil.copy(ROOT / "configs" / "test.yaml", tmp_path / "empty" / "config.json")
            spec["path"] = "empty"
        elif spec.get("path", "").startswith("SD:"):
            spec["path"] = _bad_state_dict(tmp_path, spec["path"][3:])
        elif spec.get("path") == "RUN":  # a training run folder whose step 10 is "ft-10" too
            (tmp_path / "run").mkdir()
            (tmp_path / "run" / "checkpoint-10").symlink_to(default_model_dir())
            spec["path"] = "run"
    for spec in changes.get("corpora", {}).values():
        if spec.get("path") == "DUP_IDS":  # ids a and b repeated: every repeating row named, by line
            rows = [("a", "one"), ("b", "two"), ("a", "three"), ("c", "four"), ("b", "five"), ("a", "six")]
            (tmp_path / "dup.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
            spec["path"] = "dup.jsonl"
        elif spec.get("path") == "BAD_UTF8":
            (tmp_path / "bad.txt").write_bytes(b"fine\ncaf\xe9\n")
            spec["path"] = "bad.txt"
    config = write_config(tmp_path, **changes)
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode != 0
    assert needle in run.stdout + run.stderr, (run.stdout + run.stderr)[-2000:]
    assert not (tmp_path / "results").exists()


def test_duplicate_name_in_yaml_fails(tmp_path):
    """YAML itself keeps the last of two equal keys silently; the workflow refuses them."""
    config = write_config(tmp_path)
    text = config.read_text().replace("checkpoints:\n", "checkpoints:\n  minilm:\n    kind: hf\n    path: default\n", 1)
    config.write_text(text)
    assert text.count("  minilm:") == 2
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode != 0
    assert "duplicate name 'minilm'" in run.stdout + run.stderr, (run.stdout + run.stderr)[-2000:]
    assert not (tmp_path / "results").exists()
