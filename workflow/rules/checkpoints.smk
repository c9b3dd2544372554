# Checkpoints the workflow makes: random_init, state_dict and finetune (scripts/make_checkpoint.py).


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


rule train_run:
    # kind run with `train`: a small GPT-2 trained on repeated random sequences, its checkpoints and
    # their in-context loss (scripts/train_induction.py; configs/induction.yaml).
    input:
        tokenizer=lambda w: MADE[w.name]["train"]["tokenizer"],
        probes=lambda w: MADE[w.name]["train"]["probes"],
    output:
        directory(f"{OUT}/models/{{name}}"),
    wildcard_constraints:
        name="|".join(n for n, s in MADE.items() if s["kind"] == "run") or "^$",
    params:
        steps=lambda w: MADE[w.name]["train"]["steps"],
        every=lambda w: MADE[w.name]["train"]["save_every"],
        options=lambda w: " ".join(
            f"--{key.replace('_', '-')} {MADE[w.name]['train'][key]}"
            for key in ("seed", "lr", "batch_size", "layers", "heads", "width") if key in MADE[w.name]["train"]),
    log:
        f"{OUT}/logs/models/{{name}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{{name}}.tsv"
    threads: 1  # one thread: faster than two on a small model (no thread contention)
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} {PY:q} {BASE:q}/scripts/train_induction.py "
        "--tokenizer {input.tokenizer:q} --probe-corpus {input.probes:q} --steps {params.steps} "
        "--save-every {params.every} {params.options} --out-dir {output:q} > {log:q} 2>&1"
