# Zero-shot evaluation of the trained model on each configured perturbation screen (`txfm evaluate`).
# Included only when evaluate.enabled is true and the txfm.evaluate module is installed.


rule evaluate_screen:
    input:
        model=f"{TRAIN_DIR}/train_result.json",
        corpus=f"{CORPUS}/manifest.json",
        screen=lambda wildcards: f"{RAW}/{SCREENS[wildcards.screen]['fetch_name']}/download.json",
    output:
        results=f"{RESULTS}/evaluate/{{screen}}/results.csv",
        recall=report(
            f"{RESULTS}/evaluate/{{screen}}/recall_by_database.png",
            caption="../report/recall.rst",
            category="3. Evaluation",
            subcategory="{screen}",
            labels={"screen": "{screen}", "figure": "recall"},
        ),
        consistency=report(
            f"{RESULTS}/evaluate/{{screen}}/consistency.png",
            caption="../report/consistency.rst",
            category="3. Evaluation",
            subcategory="{screen}",
            labels={"screen": "{screen}", "figure": "consistency"},
        ),
    params:
        args=lambda wildcards: screen_args(wildcards.screen),
        run=lambda wildcards, input: os.path.dirname(input.model),
        corpus=lambda wildcards, input: os.path.dirname(input.corpus),
        out=lambda wildcards, output: os.path.dirname(output.results),
    wildcard_constraints:
        screen="|".join(re.escape(name) for name in SCREENS),
    log:
        f"{LOGS}/evaluate/{{screen}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{screen}}.tsv"
    threads: config["evaluate"]["threads"]
    resources:
        mem_mb=config["evaluate"]["mem_mb"],
        runtime=config["evaluate"]["runtime"],
    conda:
        "../envs/txfm.yaml"
    shell:
        "python -m txfm.cli evaluate {params.args} --checkpoint {params.run} --corpus {params.corpus} "
        "--out {params.out} --no-progress > {log} 2>&1"
