# Stage 2: a figure of every head and the prepared JSON of each figures.texts text.


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
