"""The one streamed-h5ad writer of the simulators: CSR ``X`` appended chunk by chunk, atomically.

Memory is one chunk of counts plus ``obs``/``var``; ``anndata.read_h5ad(path, backed="r")`` opens the result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from curation.io import atomic_path


def write_streamed_h5ad(path: str | os.PathLike, obs: pd.DataFrame, var: pd.DataFrame,
                        chunks: Iterable[sp.csr_matrix], progress: bool = False, desc: str = "write h5ad") -> Path:
    """Write an h5ad whose ``X`` is the row-wise concatenation of ``chunks`` (CSR, ``len(var)`` columns each).

    ``obs`` has one row per cell of all chunks together (its index becomes ``obs_names``). Raises ``ValueError``
    when the chunks' rows do not add up to ``len(obs)`` (nothing is left at ``path`` then).
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    path = Path(path)
    n_rows = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["encoding-type"], handle.attrs["encoding-version"] = "anndata", "0.1.0"
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        matrix = None
        with tqdm(total=len(obs), desc=desc, unit="cell", disable=not progress) as bar:
            for chunk in chunks:
                chunk = sp.csr_matrix(chunk)
                if chunk.shape[1] != len(var):
                    raise ValueError(f"{path}: a chunk has {chunk.shape[1]} columns, var has {len(var)} rows")
                if matrix is None:
                    write_elem(handle, "X", chunk)
                    matrix = sparse_dataset(handle["X"])
                else:
                    matrix.append(chunk)
                n_rows += chunk.shape[0]
                bar.update(chunk.shape[0])
        if n_rows != len(obs):
            raise ValueError(f"{path}: the chunks hold {n_rows} rows, obs has {len(obs)}")
        for group in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            write_elem(handle, group, {})
    return path
