# Corpora -> JSONL shards of shard_size texts, with the ids of attnpipe.extract.corpus.


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
        skip_empty=lambda w: "--skip-empty" if config["corpora"][w.corpus].get("skip_empty") else "",
    log:
        f"{OUT}/logs/split_corpus/{{corpus}}/shard_{{shard}}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY:q} {BASE:q}/scripts/split_corpus.py {input:q} --name {wildcards.corpus} "
        "--shard-size {params.size} --text-column {params.text_column:q} {params.id_column} {params.skip_empty} "
        "--shard {wildcards.shard} --output-file {output:q} > {log:q} 2>&1"
