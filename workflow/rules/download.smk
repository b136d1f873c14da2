rule download:
    input:
        sample="data/sample",
        code=stage_code("download"),
    output:
        directory("data/raw"),
    params:
        data=config["data"],
    log:
        log_path("download", per_scheme=False),
    benchmark:
        benchmark_path("download", per_scheme=False)
    conda:
        "../envs/segflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    shell:
        "python -m stages.download --params params.yaml --out {output} > {log} 2>&1"
