# Stage 2: per-shard metrics and their merge, the checkpoint comparison, the reports.


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


rule circuits:
    # Head detectors over the checkpoints of a probe corpus, the phase change, in words (config circuits).
    input:
        attention=lambda w: merged(w.corpus),
        models=lambda w: sorted({m for c in ORDER if (m := CKPTS[c][1])}),
    output:
        f"{OUT}/circuits/{{corpus}}/circuits.md",
    params:
        outdir=lambda w, output: str(Path(output[0]).parent),
        loss=in_context_loss_flag(),
        top=CIRCUITS.get("top", 3) if CIRCUITS else 3,
        max_offset=CIRCUITS.get("max_offset", 64) if CIRCUITS else 64,
        title=lambda w: f"{CIRCUITS.get('title', 'Circuits over training')}: {w.corpus}" if CIRCUITS else "",
    log:
        f"{OUT}/logs/circuits/{{corpus}}.log",
    benchmark:
        f"{OUT}/benchmarks/circuits/{{corpus}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{PY:q} {BASE:q}/analyze_attention.py circuits {input.attention:q} --output-dir {params.outdir:q} "
        "{params.loss} --top {params.top} --max-offset {params.max_offset} --title {params.title:q} "
        "> {log:q} 2>&1"
