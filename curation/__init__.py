"""curation: turn public RNA-seq files into the DiverseRNA corpus (deduplicated, QC-filtered Parquet shards)."""

__version__ = "0.1.0"
