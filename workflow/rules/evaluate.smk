rule evaluate:
    input:
        pred="predictions/{scheme}",
        gt="data/masks/{scheme}",
        code=stage_code("evaluate"),
    output:
        metrics="metrics/{scheme}.json",
        confusion="metrics/{scheme}.confusion.csv",
        confusion_plot="metrics/{scheme}.confusion.png",
        samples="metrics/{scheme}.samples.csv",
    params:
        **stage_params("evaluate"),
    log:
        log_path("evaluate"),
    benchmark:
        benchmark_path("evaluate")
    conda:
        "../envs/segflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m stages.evaluate --params params.yaml --scheme {wildcards.scheme} "
        "--pred {input.pred}/val --gt {input.gt}/val --out {output.metrics} "
        "--confusion {output.confusion} --confusion-plot {output.confusion_plot} "
        "--samples {output.samples} > {log} 2>&1"
