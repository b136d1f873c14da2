rule train:
    input:
        raw="data/raw",
        masks="data/masks/{scheme}",
        code=stage_code("train"),
    output:
        directory("models/{scheme}"),
    params:
        scheme=lambda w: config["schemes"][w.scheme],
        model=config["model"],
        train=config["train"],
    log:
        log_path("train"),
    benchmark:
        benchmark_path("train")
    conda:
        "../envs/segflow.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=720,
    shell:
        "python -m stages.train --params params.yaml --scheme {wildcards.scheme} "
        "--raw {input.raw} --masks {input.masks} --out {output} > {log} 2>&1"
