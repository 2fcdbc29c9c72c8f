"""10x Genomics feature-barcode HDF5 matrices: read and write."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp



from hishrst_train.data.errors import _error

__all__ = ['read_10x_h5', 'write_10x_h5']

log = logging.getLogger("hishrst")

# ---------------------------------------------------------------------------------------------------
# 10x HDF5
# ---------------------------------------------------------------------------------------------------


def _decode(a: np.ndarray) -> np.ndarray:
    return np.array([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a], dtype=object)


def _read_10x_h5(path: Path, *, gex_only: bool = True) -> tuple[Any, dict[str, Any]]:
    import anndata as ad

    if not path.is_file():
        raise _error(path, "the 10x feature-barcode matrix file does not exist",
                     "point to Space Ranger's outs/ folder, which contains filtered_feature_bc_matrix.h5")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _error(path, f"not a readable HDF5 file ({e})", "re-copy filtered_feature_bc_matrix.h5 from Space Ranger's outs/") from e
    with f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if "matrix" in f:
            g = f["matrix"]
            feats = g.get("features")
            if feats is None:
                raise _error(path, "group 'matrix' has no 'features' subgroup", "write the file with Space Ranger ≥ 3 or write_10x_h5")
            ids, names = feats.get("id"), feats.get("name")
            ftypes = _decode(feats["feature_type"][()]) if "feature_type" in feats else None
            genome = _decode(feats["genome"][()]) if "genome" in feats else None
        elif len(f.keys()) == 1:  # Cell Ranger 2 layout: one group per genome
            g = f[next(iter(f.keys()))]
            ids, names, ftypes, genome = g.get("genes"), g.get("gene_names"), None, None
        else:
            raise _error(path, f"no 'matrix' group (found {sorted(f.keys())})", "pass a 10x feature-barcode matrix .h5 file")
        missing = [k for k in ("barcodes", "data", "indices", "indptr", "shape") if k not in g]
        if missing or ids is None or names is None:
            raise _error(path, f"the matrix is missing datasets {missing or ['features/id or name']}",
                         "re-export the matrix from Space Ranger; the file is truncated or not a 10x matrix")
        shape = tuple(int(v) for v in g["shape"][()])
        barcodes = _decode(g["barcodes"][()])
        ids, names = _decode(ids[()]), _decode(names[()])
        data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
    if len(shape) != 2:
        raise _error(path, f"matrix/shape must have 2 entries (genes, barcodes), got {shape}", "re-export the matrix")
    n_genes, n_bc = shape
    if len(ids) != n_genes or len(names) != n_genes:
        raise _error(path, f"gene count mismatch: matrix/shape says {n_genes} genes but features lists {len(ids)} ids and {len(names)} names",
                     "the matrix and its feature list come from different runs; re-export filtered_feature_bc_matrix.h5")
    if len(barcodes) != n_bc or len(indptr) != n_bc + 1:
        raise _error(path, f"barcode count mismatch: matrix/shape says {n_bc} barcodes, barcodes has {len(barcodes)}, indptr {len(indptr)}",
                     "re-export filtered_feature_bc_matrix.h5")
    if indptr[-1] != len(data) or len(indices) != len(data) or (len(indices) and int(indices.max()) >= n_genes):
        raise _error(path, "the sparse matrix arrays (data/indices/indptr) are inconsistent", "re-export filtered_feature_bc_matrix.h5")
    # CSC (genes × barcodes) has exactly the arrays of CSR (barcodes × genes).
    X = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_bc, n_genes))
    X.sort_indices()
    var = pd.DataFrame({"gene_ids": ids.astype(str)}, index=pd.Index(names.astype(str)))
    for col, vals in (("feature_types", ftypes), ("genome", genome)):
        if vals is not None:
            var[col] = vals.astype(str)
    with warnings.catch_warnings():  # duplicate symbols are made unique below, as scanpy does
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))), var=var)
        if gex_only and "feature_types" in var:
            adata = adata[:, var["feature_types"].to_numpy() == "Gene Expression"].copy()
        adata.var_names_make_unique()
    return adata, attrs


def read_10x_h5(path: str | Path, *, gex_only: bool = True) -> Any:
    """Read a 10x HDF5 feature-barcode matrix into AnnData (``X`` counts, CSR float32, barcodes × genes).

    Supports the Space Ranger/Cell Ranger ≥ 3 layout (``matrix/features``) and the legacy per-genome
    layout. ``gex_only`` keeps ``Gene Expression`` features only. Gene names are made unique.
    """
    return _read_10x_h5(Path(path), gex_only=gex_only)[0]


def write_10x_h5(
    adata: Any, path: str | Path, *, library_id: str | None = None, genome: str = "unknown",
    chemistry_description: str = "Spatial 3' v1", software_version: str = "hishrst",
) -> Path:
    """Write AnnData counts as a 10x HDF5 feature-barcode matrix (CSC genes × barcodes, int32 data).

    ``X`` must hold non-negative integer counts. ``var['gene_ids']`` (else the gene names),
    ``var['feature_types']`` (else ``Gene Expression``) and ``var['genome']`` (else ``genome``) are
    written as features; ``read_10x_h5`` of the result reproduces ``X``, names, ids and types exactly.
    """
    path = Path(path)
    n_var = adata.n_vars
    var = adata.var
    ids = var["gene_ids"].astype(str).to_numpy() if "gene_ids" in var else np.asarray(adata.var_names, dtype=str)
    ftypes = var["feature_types"].astype(str).to_numpy() if "feature_types" in var else np.full(n_var, "Gene Expression")
    genomes = var["genome"].astype(str).to_numpy() if "genome" in var else np.full(n_var, genome)
    _write_10x_arrays(
        path, adata.X, barcodes=adata.obs_names, names=adata.var_names, ids=ids, feature_types=ftypes, genomes=genomes,
        library_id=library_id or path.parent.name, chemistry_description=chemistry_description, software_version=software_version,
    )
    return path


def _write_10x_arrays(
    path: Path, X: Any, *, barcodes: Any, names: Any, ids: Any, feature_types: Any, genomes: Any,
    library_id: str, chemistry_description: str, software_version: str,
) -> None:
    """Write a barcodes × genes count matrix as a 10x HDF5 file (the arrays behind :func:`write_10x_h5`)."""
    X = sp.csr_matrix(X) if not sp.issparse(X) else sp.csr_matrix(X, copy=True)
    X.sort_indices()
    X.eliminate_zeros()
    data = np.asarray(X.data)
    if data.size and (np.any(data < 0) or np.any(np.round(data) != data)):
        raise _error(path, "X does not hold raw counts (negative or non-integer values)",
                     "write the raw UMI counts (e.g. adata.layers['counts']), not normalised values")
    n_obs, n_var = X.shape

    def b(a: Any) -> np.ndarray:
        arr = np.asarray([str(x).encode("utf-8") for x in a])
        return arr if arr.size else np.zeros(0, dtype="S1")

    kw = {"compression": "gzip", "compression_opts": 4}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"filetype": "matrix", "version": 2, "library_ids": np.array([library_id.encode()]),
                        "original_gem_groups": np.array([1], dtype=np.int64),
                        "chemistry_description": chemistry_description, "software_version": software_version})
        g = f.create_group("matrix")
        for key, arr in (("barcodes", b(barcodes)), ("data", data.astype(np.int32)),
                         ("indices", X.indices.astype(np.int64)), ("indptr", X.indptr.astype(np.int64))):
            g.create_dataset(key, data=arr, **kw)
        g.create_dataset("shape", data=np.array([n_var, n_obs], dtype=np.int32))
        ft = g.create_group("features")
        ft.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        for key, vals in (("feature_type", feature_types), ("genome", genomes), ("id", ids), ("name", names)):
            ft.create_dataset(key, data=b(vals), **kw)


