# Training: `txfm train` (or torchrun --nproc_per_node=<gpus> when gpus > 1) through workflow/scripts/train_run.py,
# which resumes a run killed part-way (cluster time limit) when its settings are unchanged. With
# prebuilt_corpus: true the corpus is an existing directory and nothing upstream is scheduled.


rule train_model:
    input:
        corpus=f"{CORPUS}/manifest.json",
        config=TRAIN["config"],
    output:
        result=f"{TRAIN_DIR}/train_result.json",
        curve=report(
            f"{TRAIN_DIR}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="2. Training",
            labels={"figure": "loss curve"},
        ),
    params:
        run=lambda wildcards, output: os.path.dirname(output.result),
        corpus=lambda wildcards, input: os.path.dirname(input.corpus),
        gpus=TRAIN["gpus"],
        overrides=train_overrides(),
        script=os.path.relpath(f"{workflow.basedir}/scripts/train_run.py"),
    log:
        f"{LOGS}/train_model.log",
    benchmark:
        f"{BENCH}/train_model.tsv"
    threads: TRAIN["threads"]
    resources:
        **train_resources(),
    conda:
        "../envs/txfm.yaml"
    shell:
        "python {params.script} --corpus {params.corpus} --out {params.run} --config {input.config} "
        "--gpus {params.gpus} -- {params.overrides} > {log} 2>&1"
