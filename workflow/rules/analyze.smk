rule analyze:
    input:
        predictions="predictions/{scheme}",
        masks="data/masks/{scheme}",
        code=stage_code("analyze"),
    output:
        directory("analysis/{scheme}"),
    params:
        analyze=config["analyze"],
    log:
        log_path("analyze"),
    benchmark:
        benchmark_path("analyze")
    conda:
        "../envs/segflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.analyze --params params.yaml --predictions {input.predictions} "
        "--masks {input.masks} --out {output} > {log} 2>&1"
