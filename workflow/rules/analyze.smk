rule analyze:
    input:
        # the first seed's model and predictions: the one analysed
        predictions=f"predictions/{{scheme}}/seed{FIRST_SEED}",
        masks="data/masks/{scheme}",
        model=f"models/{{scheme}}/seed{FIRST_SEED}",
        raw="data/raw",
        code=stage_code("analyze"),
    output:
        directory("analysis/{scheme}"),
    params:
        **stage_params("analyze"),
    log:
        log_path("analyze"),
    benchmark:
        benchmark_path("analyze")
    conda:
        "../envs/segflow.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    shell:
        "python -m stages.analyze --params params.yaml --predictions {input.predictions} "
        "--masks {input.masks} --model {input.model} --raw {input.raw} --out {output} "
        "> {log} 2>&1"
