"""txfm: the TxFM masked-expression transformer, trained on DiverseRNA corpus shards."""

__version__ = "0.1.0"
