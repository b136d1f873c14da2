rule masks:
    input:
        raw="data/raw",
        code=stage_code("masks"),
    output:
        directory("data/masks/{scheme}"),
    params:
        **stage_params("masks"),
    log:
        log_path("masks"),
    benchmark:
        benchmark_path("masks")
    conda:
        "../envs/segflow.yaml"
    # one process per worker (the stage caps them at the CPUs it may use)
    threads: config["masks"]["workers"]
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "python -m stages.masks --params params.yaml --scheme {wildcards.scheme} "
        "--raw {input.raw} --out {output} > {log} 2>&1"
