"""Files as users save them: scanpy's (log-normalised X, counts in layers['counts']) and
CELLxGENE's (normalised X, counts in .raw, Ensembl ids as var_names, symbols in var['feature_name'])."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from conftest import snakemake, write_config
from scnbvi import data
from scnbvi.data import RAW_COUNTS_FIX, read_counts, read_selected_counts
from scnbvi.errors import InputError
from scnbvi.offsets import covariate_tables, gene_identifiers, gene_lengths_from_gtf

N_CELLS, N_GENES = 60, 30
SYMBOLS = [f"Gene{j}" for j in range(N_GENES)]
ENSEMBL = [f"ENSMUSG{j:011d}" for j in range(N_GENES)]
STORAGE = {"sparse": sp.csr_matrix, "dense": lambda matrix: matrix.toarray()}
SMALL_BLOCKS = 3 * N_GENES  # a few cells per block


def counts() -> np.ndarray:
    """Poisson counts; every cell has some, so normalising divides by no zero."""
    rng = np.random.default_rng(0)
    matrix = rng.poisson(rng.uniform(0.5, 4.0, N_GENES), size=(N_CELLS, N_GENES))
    matrix[:, 0] += 1
    return matrix


def cells() -> pd.DataFrame:
    return pd.DataFrame({"condition": pd.Categorical(np.resize(["control", "treated"], N_CELLS))},
                        index=[f"AAAC{i:04d}" for i in range(N_CELLS)])


def normalised(adata: ad.AnnData) -> None:
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)


def scanpy_style(storage: str) -> ad.AnnData:
    """As the scanpy tutorials leave a file: counts copied to a layer, then X normalised in place."""
    adata = ad.AnnData(X=sp.csr_matrix(counts().astype(np.float32)), obs=cells(), var=pd.DataFrame(index=SYMBOLS))
    adata.layers["counts"] = adata.X.copy()
    normalised(adata)
    adata.X = STORAGE[storage](adata.X)
    adata.layers["counts"] = STORAGE[storage](adata.layers["counts"])
    return adata


def cellxgene_style(storage: str, n_genes_in_x: int = N_GENES) -> ad.AnnData:
    """As CELLxGENE serves a file: float32 counts in .raw, normalised X (here over the first genes
    only, as after a gene selection), Ensembl ids as var_names and symbols in var['feature_name']."""
    var = pd.DataFrame({"feature_name": pd.Categorical(SYMBOLS), "feature_biotype": "gene"},
                       index=pd.Index(ENSEMBL, name="gene_ids"))
    adata = ad.AnnData(X=sp.csr_matrix(counts().astype(np.float32)), obs=cells(), var=var)
    adata.raw = adata
    adata = adata[:, :n_genes_in_x].copy()
    normalised(adata)
    adata.X = STORAGE[storage](adata.X)
    if storage == "dense":
        adata.raw = ad.AnnData(X=adata.raw.X.toarray(), obs=adata.obs, var=adata.raw.var)
    return adata


def saved(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


@pytest.mark.parametrize("block_entries", [50_000_000, SMALL_BLOCKS], ids=["at-once", "in-blocks"])
@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_layer_counts_of_a_scanpy_file_gives_the_counts(tmp_path, storage, block_entries):
    original = scanpy_style(storage)
    path = saved(original, tmp_path / "scanpy.h5ad")

    loaded = read_counts(path, block_entries=block_entries, layer="counts")

    assert isinstance(loaded.X, sp.csr_matrix) and loaded.X.dtype == np.int32
    np.testing.assert_array_equal(loaded.X.toarray(), counts())
    assert list(loaded.obs_names) == list(original.obs_names)
    assert list(loaded.var_names) == SYMBOLS
    assert list(loaded.obs["condition"]) == list(original.obs["condition"])
    assert loaded.uns["log1p"]["base"] is None
    assert not loaded.layers and loaded.raw is None


@pytest.mark.parametrize("block_entries", [50_000_000, SMALL_BLOCKS], ids=["at-once", "in-blocks"])
@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_raw_of_a_cellxgene_file_gives_the_counts_with_the_genes_of_raw(tmp_path, storage, block_entries):
    path = saved(cellxgene_style(storage, n_genes_in_x=20), tmp_path / "cellxgene.h5ad")

    loaded = read_counts(path, block_entries=block_entries, layer="raw")

    assert isinstance(loaded.X, sp.csr_matrix) and loaded.X.dtype == np.int32
    np.testing.assert_array_equal(loaded.X.toarray(), counts())
    assert list(loaded.var_names) == ENSEMBL
    assert list(loaded.var["feature_name"]) == SYMBOLS
    assert list(loaded.obs_names) == list(cells().index)


@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_scanpy_file_without_the_layer_configured_names_the_config_line(tmp_path, storage):
    adata = scanpy_style(storage)
    path = saved(adata, tmp_path / "scanpy.h5ad")
    lognorm = adata.X if storage == "dense" else adata.X.toarray()
    fractional = lognorm != np.round(lognorm)
    first_gene = int(np.argmax(fractional[0]))

    with pytest.raises(InputError) as error:
        read_counts(path)

    assert str(error.value) == (
        f"{path}: X: {int(fractional.sum()):,} non-integer values (first: cell 'AAAC0000', "
        f"gene {SYMBOLS[first_gene]!r} = {lognorm[0, first_gene]:g}); "
        "fix: the raw counts are in layers['counts']: add \"load: {layer: counts}\" to this data set's config"
    )
    with pytest.raises(InputError, match=r"fix: the raw counts are in layers\['counts'\]: add"):
        read_counts(path, block_entries=SMALL_BLOCKS)


def test_cellxgene_file_without_the_layer_configured_names_raw(tmp_path):
    path = saved(cellxgene_style("sparse"), tmp_path / "cellxgene.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(path)

    assert error.value.field == "X"
    assert "non-integer values (first: cell 'AAAC0000', gene 'ENSMUSG00000000000'" in error.value.problem
    assert error.value.fix == "the raw counts are in raw.X: add \"load: {layer: raw}\" to this data set's config"


def test_every_matrix_holding_counts_is_named_with_the_counts_layer_first(tmp_path):
    adata = cellxgene_style("sparse")
    adata.layers["spliced"] = sp.csr_matrix(counts())
    adata.layers["raw counts"] = sp.csr_matrix(counts())
    path = saved(adata, tmp_path / "both.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(path)

    assert error.value.fix == (
        "the raw counts are in layers['raw counts'] (integers also in raw.X, layers['spliced']): "
        "add \"load: {layer: 'raw counts'}\" to this data set's config"
    )


def test_a_normalised_layer_chosen_over_counts_in_x_says_to_remove_it(tmp_path):
    adata = ad.AnnData(X=sp.csr_matrix(counts()), obs=cells(), var=pd.DataFrame(index=SYMBOLS))
    adata.layers["lognorm"] = np.log1p(adata.X.toarray().astype(np.float32))
    path = saved(adata, tmp_path / "counts_in_x.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(path, layer="lognorm")

    assert error.value.field == "layers['lognorm']"
    assert error.value.fix == "the raw counts are in X: remove load.layer from this data set's config"


def test_without_counts_anywhere_the_general_fix_stands(tmp_path):
    adata = scanpy_style("sparse")
    adata.layers["counts"] = adata.X.copy()  # normalised too
    path = saved(adata, tmp_path / "no_counts.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(path)

    assert error.value.fix == RAW_COUNTS_FIX


def test_only_the_first_cells_of_other_matrices_are_read_to_find_the_counts(tmp_path, monkeypatch):
    """A big file must not be read twice to write one error: candidates are judged on their first cells."""
    monkeypatch.setattr(data, "CANDIDATE_ENTRIES", 2 * N_GENES)
    adata = scanpy_style("dense")
    later_cells_normalised = adata.layers["counts"].astype(np.float32)
    later_cells_normalised[2:] += 0.5
    adata.layers["counts"] = later_cells_normalised
    path = saved(adata, tmp_path / "scanpy.h5ad")

    with pytest.raises(InputError, match=r"layers\['counts'\]: add"):
        read_counts(path)


def test_a_missing_layer_lists_the_layers_and_whether_raw_exists(tmp_path):
    scanpy_file = saved(scanpy_style("sparse"), tmp_path / "scanpy.h5ad")
    cellxgene_file = saved(cellxgene_style("sparse"), tmp_path / "cellxgene.h5ad")

    with pytest.raises(InputError) as error:
        read_counts(scanpy_file, layer="spliced")
    assert str(error.value) == (
        f"{scanpy_file}: layers['spliced']: no such layer (layers: ['counts']; adata.raw: absent); "
        "fix: set load.layer to one of the layers, raw for adata.raw, or remove it to read X"
    )
    with pytest.raises(InputError) as error:
        read_counts(scanpy_file, layer="raw")
    assert str(error.value) == (
        f"{scanpy_file}: raw: the file has no adata.raw (layers: ['counts']; adata.raw: absent); "
        "fix: set load.layer to one of the layers, or remove it to read X"
    )
    with pytest.raises(InputError, match=r"no such layer \(layers: \[\]; adata.raw: present\)"):
        read_counts(cellxgene_file, layer="counts")


def test_layer_values_are_checked_under_their_own_name(tmp_path):
    adata = scanpy_style("sparse")
    bad = adata.layers["counts"].tolil()
    bad[3, 2] = -1
    adata.layers["counts"] = bad.tocsr()
    path = saved(adata, tmp_path / "negative.h5ad")

    with pytest.raises(InputError, match=r"layers\['counts'\]: 1 negative values \(first: cell 'AAAC0003', "
                                         r"gene 'Gene2' = -1\)"):
        read_counts(path, layer="counts", block_entries=SMALL_BLOCKS)


GTF_LINE = 'chr1\tsrc\texon\t{start}\t{end}\t.\t+\t.\tgene_id "{gene_id}"; gene_name "{name}";\n'


def gtf(tmp_path, lengths: dict) -> str:
    """One exon per gene: gene_id the Ensembl id, gene_name the symbol."""
    path = tmp_path / "genes.gtf"
    path.write_text("".join(GTF_LINE.format(start=1, end=length, gene_id=ENSEMBL[SYMBOLS.index(name)], name=name)
                            for name, length in lengths.items()))
    return str(path)


def length_settings(**gene_length) -> dict:
    return {
        "gene_length": {"source": "gtf", "path": None, "attribute": "gene_id", "var_column": None,
                        "column": "length", **gene_length},
        "depth": {"source": "total_counts", "column": "Bases", "constant": 1e4, "per_cell": True},
        "depth_ref": 1e5, "length_ref": 2000.0, "seed": 0,
    }


def test_gtf_matches_the_symbols_of_a_var_column(tmp_path):
    adata = read_counts(saved(cellxgene_style("sparse"), tmp_path / "cellxgene.h5ad"), layer="raw")
    lengths = {name: 1000 + 10 * j for j, name in enumerate(SYMBOLS)}
    path = gtf(tmp_path, lengths)

    _, genes = covariate_tables(adata, length_settings(path=path, attribute="gene_name", var_column="feature_name"))
    _, by_id = covariate_tables(adata, length_settings(path=path))

    assert list(genes.index) == ENSEMBL
    np.testing.assert_array_equal(genes["length"], list(lengths.values()))
    np.testing.assert_array_equal(by_id["length"], genes["length"])


def test_length_table_matches_a_var_column(tmp_path):
    adata = read_counts(saved(cellxgene_style("sparse"), tmp_path / "cellxgene.h5ad"), layer="raw")
    table = tmp_path / "lengths.tsv"
    table.write_text("gene\tlength\n" + "".join(f"{name}\t{500 + j}\n" for j, name in enumerate(reversed(SYMBOLS))))

    _, genes = covariate_tables(adata, length_settings(source="table", path=str(table), var_column="feature_name"))

    np.testing.assert_array_equal(genes["length"], [500 + N_GENES - 1 - j for j in range(N_GENES)])


def test_symbols_matched_against_ensembl_ids_point_to_var_column(tmp_path):
    adata = read_counts(saved(cellxgene_style("sparse"), tmp_path / "cellxgene.h5ad"), layer="raw")
    path = gtf(tmp_path, {name: 1000 for name in SYMBOLS})

    with pytest.raises(InputError) as error:
        covariate_tables(adata, length_settings(path=path, attribute="gene_name"))

    assert error.value.problem == (
        f"none of the {N_GENES} genes of the data is in it (data: {ENSEMBL[:3]}, file: ['Gene0', 'Gene1', 'Gene10'])"
    )
    assert "covariates.gene_length.var_column" in error.value.fix


def test_a_missing_var_column_lists_the_columns():
    adata = cellxgene_style("sparse")

    with pytest.raises(InputError) as error:
        gene_identifiers(adata, "gene_symbols")

    assert error.value.field == "var_column"
    assert "available: ['feature_name', 'feature_biotype']" in error.value.problem


def test_missing_symbols_in_a_var_column_match_no_gene(tmp_path):
    adata = cellxgene_style("sparse")
    adata.var["feature_name"] = adata.var["feature_name"].astype(object)
    adata.var.loc[ENSEMBL[1], "feature_name"] = np.nan
    path = gtf(tmp_path, {name: 1000 for name in SYMBOLS})

    with pytest.raises(InputError, match=r"1 of 30 genes of the data are missing \(first: \[None\]\)"):
        gene_lengths_from_gtf(path, gene_identifiers(adata, "feature_name"), attribute="gene_name")


@pytest.mark.slow
def test_workflow_fits_a_cellxgene_file_from_raw_with_lengths_by_symbol(workflow_copy):
    data_dir = workflow_copy / "data"
    data_dir.mkdir()
    path = saved(cellxgene_style("sparse", n_genes_in_x=20), data_dir / "cellxgene.h5ad")
    annotation = gtf(data_dir, {name: 1000 + 10 * j for j, name in enumerate(SYMBOLS)})
    config = write_config(workflow_copy, {"datasets": {"cxg": {
        "path": path,
        "load": {"layer": "raw"},
        "covariates": {"gene_length": {"source": "gtf", "path": annotation, "attribute": "gene_name",
                                       "var_column": "feature_name"}},
        "inference": {"max_iterations": 300, "draws": 20},
    }}})

    result = snakemake(workflow_copy, "results/cxg/trace.nc", "--configfile", config)

    assert result.returncode == 0, result.stderr[-3000:]
    out = workflow_copy / "results" / "cxg"
    fitted = read_selected_counts(path, out / "selection.h5ad", layer="raw")  # the counts the fit saw
    np.testing.assert_array_equal(fitted.X.toarray(), counts())
    assert list(fitted.var_names) == ENSEMBL and fitted.raw is None
    assert json.loads((out / "qc.json").read_text())["actions"]["layer"] == "raw"
    genes = pd.read_csv(out / "covariates_genes.tsv", sep="\t", index_col="gene")
    np.testing.assert_array_equal(genes["length"], [1000 + 10 * j for j in range(N_GENES)])
    assert (out / "trace.nc").stat().st_size > 0
