# Stage 1: one attention file per (checkpoint, shard), then one per (checkpoint, corpus).


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
