"""Simulated biology and every simulated input format, for the offline demo, the tests and the benchmarks.

Nothing in :mod:`curation` or :mod:`txfm` imports this package: it depends on them, not the other way round.

* :mod:`simulation.biology` — the one biology model (genes, modules, knock-downs, count noise);
* :mod:`simulation.sources` — raw sources in every real reader format, with the truth of what was planted;
* :mod:`simulation.corpus` — corpora in the shard layout of :mod:`curation.schema`;
* :mod:`simulation.screen` — CRISPR screens with planted modules for the evaluation;
* :mod:`simulation.h5ad` — the streamed-h5ad writer they share; :mod:`simulation.demo` — the curation demo.

Command line: ``python -m simulation sources|demo`` (``--help``).
"""
