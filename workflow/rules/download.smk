# Work in progress (checkpoints/download: complete files, *.part files) is deliberately no
# output of either engine, which delete outputs before a job: a killed or failed download
# resumes from it, and it becomes data/raw in one rename when everything is verified.
rule download:
    input:
        sample="data/sample",
        code=stage_code("download"),
    output:
        directory("data/raw"),
    params:
        **stage_params("download"),
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
        "python -m stages.download --params params.yaml --out {output} "
        "--checkpoints checkpoints/download > {log} 2>&1"
