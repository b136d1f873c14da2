rule evaluate:
    input:
        # every seed's predictions (train.seeds): evaluate scores each of them
        pred=expand("predictions/{{scheme}}/seed{seed}", seed=SEEDS),
        gt="data/masks/{scheme}",
        raw="data/raw",
        code=stage_code("evaluate"),
    output:
        metrics="metrics/{scheme}.json",
        confusion="metrics/{scheme}.confusion.csv",
        confusion_plot="metrics/{scheme}.confusion.png",
        samples="metrics/{scheme}.samples.csv",
        categories="metrics/{scheme}.categories.csv",
        per_image="metrics/{scheme}.per_image.npz",
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
        "--pred predictions/{wildcards.scheme} --gt {input.gt}/val --out {output.metrics} "
        "--confusion {output.confusion} --confusion-plot {output.confusion_plot} "
        "--samples {output.samples} --annotations {input.raw}/annotations/instances_val.json "
        "--categories {output.categories} --per-image {output.per_image} > {log} 2>&1"
