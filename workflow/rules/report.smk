# Report tables for `snakemake --report`: Table 1 (corpus vs paper counts), the training summary and the
# evaluation results as HTML, rendered by workflow/scripts/report_tables.py.


if not PREBUILT:

    rule report_table1:
        input:
            corpus=f"{CORPUS}/manifest.json",
        output:
            report(f"{RESULTS}/report/table1.html", caption="../report/table1.rst", category="1. Corpus",
                   labels={"figure": "Table 1"}),
        params:
            paper=json.dumps({name: SOURCES[name].get("paper") for name in DATASETS}),
            script=os.path.relpath(f"{workflow.basedir}/scripts/report_tables.py"),
        log:
            f"{LOGS}/report_table1.log",
        localrule: True
        conda:
            "../envs/curation.yaml"
        shell:
            "python {params.script} table1 --manifest {input.corpus} --paper {params.paper:q} --out {output} "
            "> {log} 2>&1"


if TRAIN["enabled"]:

    rule report_training:
        input:
            result=f"{TRAIN_DIR}/train_result.json",
        output:
            report(f"{RESULTS}/report/training.html", caption="../report/training.rst", category="2. Training",
                   labels={"figure": "summary"}),
        params:
            script=os.path.relpath(f"{workflow.basedir}/scripts/report_tables.py"),
            run=lambda wildcards, input: os.path.dirname(input.result),
        log:
            f"{LOGS}/report_training.log",
        localrule: True
        conda:
            "../envs/txfm.yaml"
        shell:
            "python {params.script} training --run {params.run} --out {output} > {log} 2>&1"


if EVALUATE:

    rule report_evaluation:
        input:
            results=[f"{RESULTS}/evaluate/{screen}/results.csv" for screen in SCREENS],
        output:
            report(f"{RESULTS}/report/evaluation.html", caption="../report/evaluation.rst",
                   category="3. Evaluation", labels={"figure": "results"}),
        params:
            script=os.path.relpath(f"{workflow.basedir}/scripts/report_tables.py"),
            screens=list(SCREENS),
        log:
            f"{LOGS}/report_evaluation.log",
        localrule: True
        conda:
            "../envs/txfm.yaml"
        shell:
            "python {params.script} evaluation --results {input.results} --screens {params.screens} "
            "--out {output} > {log} 2>&1"
