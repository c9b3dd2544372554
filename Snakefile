# attnpipe workflow: corpora x checkpoints -> attention, metrics, figures, comparison, report.
# Usage: snakemake --cores 2   (configs/demo.yaml is the default config; -n plans it)
#        snakemake --profile configs/profiles/local --configfile configs/demo.yaml
#        snakemake --profile configs/profiles/slurm --configfile configs/demo.yaml   (a SLURM cluster)
# Config is validated against configs/config.schema.yaml (workflow/rules/common.smk, which also
# reads the corpora and checkpoints); the rules, in workflow/rules/*.smk, shell out to the
# project's CLIs and scripts/, which import the library, never each other.
#
# Shell commands name the interpreter and the checkout as {PY} and {BASE}, formatted when a job
# runs, never as params: Snakemake reruns a job whose params or shell text changed, and absolute
# paths there would make a moved checkout (or another venv) redo everything.
import sys

from snakemake.utils import min_version

min_version("9.0")

PY = sys.executable  # used inside shell templates only (see above)
BASE = workflow.basedir
sys.path.insert(0, BASE)  # the checkout's attnpipe, also where a (different) one is pip-installed


include: "workflow/rules/common.smk"


wildcard_constraints:
    corpus=SAFE,
    ckpt=SAFE,
    name=SAFE,
    text=SAFE,
    shard=r"\d{3}",


rule all:
    input:
        f"{OUT}/report.md",
        expand(f"{OUT}/metrics/{{corpus}}/{{ckpt}}.csv", corpus=CORPORA, ckpt=ORDER),
        [f"{OUT}/compare/{c}/checkpoint_distances.csv" for c in CORPORA if len(ORDER) > 1],
        [f"{OUT}/figures/{corpus}/{c}/{t}.heads.png" for corpus, t in FIGURES for c in ORDER],
        [f"{OUT}/figures/{corpus}/{c}/{t}.prepared.json" for corpus, t in FIGURES for c in ORDER],
        [f"{OUT}/circuits/{c}/circuits.md" for c in (CIRCUITS or {}).get("corpora", [])],


include: "workflow/rules/corpus.smk"
include: "workflow/rules/checkpoints.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/figures.smk"
