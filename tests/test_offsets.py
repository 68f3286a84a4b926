"""Tests for gene lengths, sequencing depth and the log offsets built from them."""

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnbvi.errors import InputError
from scnbvi.offsets import (
    aligned_covariates,
    covariate_tables,
    gene_lengths_from_gtf,
    gene_lengths_from_table,
    impute_gene_lengths,
    log_offsets,
    read_covariates,
    sequencing_depth,
    write_covariates,
)

# G1 (+ strand): exons 100-199 and 150-249 overlap -> 100..249 = 150 bp; 300-399 = 100 bp; 400-450 = 51 bp.
#   The gene line and the CDS must be ignored. Union: 301 bp.
# G2 (- strand): 1000-1099, 1010-1020 (inside it) and 1050-1149 -> 1000..1149 = 150 bp; 2000-2000 = 1 bp. Union: 151 bp.
GTF = """\
#!genome-build test
chr1\tsrc\tgene\t100\t450\t.\t+\t.\tgene_id "G1"; gene_name "Alpha";
chr1\tsrc\texon\t300\t399\t.\t+\t.\tgene_id "G1"; transcript_id "T1"; gene_name "Alpha";
chr1\tsrc\texon\t100\t199\t.\t+\t.\tgene_id "G1"; transcript_id "T1"; gene_name "Alpha";
chr1\tsrc\tCDS\t100\t1000\t.\t+\t0\tgene_id "G1"; transcript_id "T1"; gene_name "Alpha";
chr1\tsrc\texon\t150\t249\t.\t+\t.\tgene_id "G1"; transcript_id "T2"; gene_name "Alpha";
chr1\tsrc\texon\t400\t450\t.\t+\t.\tgene_id "G1"; transcript_id "T2"; gene_name "Alpha";
chr2\tsrc\texon\t2000\t2000\t.\t-\t.\tgene_id "G2"; transcript_id "T4"; gene_name "Beta";
chr2\tsrc\texon\t1050\t1149\t.\t-\t.\tgene_id "G2"; transcript_id "T4"; gene_name "Beta";
chr2\tsrc\texon\t1010\t1020\t.\t-\t.\tgene_id "G2"; transcript_id "T4"; gene_name "Beta";
chr2\tsrc\texon\t1000\t1099\t.\t-\t.\tgene_id "G2"; transcript_id "T3"; gene_name "Beta";
"""


@pytest.fixture
def gtf_path(tmp_path):
    path = tmp_path / "genes.gtf"
    path.write_text(GTF)
    return path


def cells_with_obs(obs: pd.DataFrame, counts=None) -> ad.AnnData:
    counts = np.ones((len(obs), 3), dtype=np.int32) if counts is None else counts
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs)


def test_gtf_lengths_are_exon_unions_in_var_order(gtf_path):
    np.testing.assert_array_equal(gene_lengths_from_gtf(gtf_path, ["G2", "G1"]), [151.0, 301.0])


def test_gtf_lengths_by_gene_name(gtf_path):
    np.testing.assert_array_equal(gene_lengths_from_gtf(gtf_path, ["Alpha", "Beta"], attribute="gene_name"),
                                  [301.0, 151.0])


def test_gtf_lengths_from_gzip(tmp_path):
    path = tmp_path / "genes.gtf.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(GTF)

    np.testing.assert_array_equal(gene_lengths_from_gtf(path, ["G1", "G2"]), [301.0, 151.0])


def test_gtf_missing_genes_are_counted_and_named(gtf_path):
    with pytest.raises(InputError, match=r"2 of 3 genes .* missing \(first: \['G3', 'G4'\]\)") as error:
        gene_lengths_from_gtf(gtf_path, ["G1", "G3", "G4"])
    assert "covariates.gene_length.source: impute" in error.value.fix
    assert error.value.source == str(gtf_path)


@pytest.mark.parametrize("header", ["gene\tlength\n", ""], ids=["with_header", "without_header"])
def test_table_lengths_with_or_without_header(tmp_path, header):
    path = tmp_path / "lengths.tsv"
    path.write_text(header + "G1\t1500\nG2\t820.5\nG3\t99\n")

    np.testing.assert_array_equal(gene_lengths_from_table(path, ["G3", "G1", "G2"]), [99.0, 1500.0, 820.5])


def test_table_rejects_missing_genes_and_bad_lengths(tmp_path):
    path = tmp_path / "lengths.tsv"
    path.write_text("G1\t1500\nG2\t0\n")
    with pytest.raises(InputError, match=r"1 lengths are not positive, finite numbers \(first: gene 'G2'"):
        gene_lengths_from_table(path, ["G1", "G2"])

    path.write_text("G1\t1500\n")
    with pytest.raises(InputError, match=r"1 of 2 genes .* missing \(first: \['G9'\]\); fix: add them to the table"):
        gene_lengths_from_table(path, ["G1", "G9"])


def test_imputed_lengths_are_seeded_and_in_range():
    lengths = impute_gene_lengths(500, seed=3)

    np.testing.assert_array_equal(lengths, impute_gene_lengths(500, seed=3))
    assert not np.array_equal(lengths, impute_gene_lengths(500, seed=4))
    assert lengths.shape == (500,)
    assert lengths.min() >= 1000 and lengths.max() <= 3000


def test_depth_from_obs_imputes_missing_and_non_positive_values():
    adata = cells_with_obs(pd.DataFrame({"Bases": [2e5, np.nan, 3e5, 0.0, -5.0]}, index=list("abcde")))

    depth, n_imputed = sequencing_depth(adata, source="obs", seed=7)
    again, _ = sequencing_depth(adata, source="obs", seed=7)

    assert n_imputed == 3
    np.testing.assert_array_equal(depth[[0, 2]], [2e5, 3e5])
    assert np.all(depth > 0)
    np.testing.assert_array_equal(depth, again)
    assert not np.array_equal(depth, sequencing_depth(adata, source="obs", seed=8)[0])
    assert adata.obs["Bases"].isna().sum() == 1


def test_depth_from_obs_rejects_missing_or_text_column():
    adata = cells_with_obs(pd.DataFrame({"reads": [1.0, 2.0], "label": ["x", "y"]}, index=["a", "b"]))

    with pytest.raises(InputError, match=r"covariates.depth: obs\['Bases'\]: column not found "
                                         r"\(available: \['reads', 'label'\]\)") as error:
        sequencing_depth(adata, source="obs")
    assert "covariates.depth.source: total_counts or constant" in error.value.fix
    with pytest.raises(InputError, match="not numeric"):
        sequencing_depth(adata, source="obs", column="label")


def test_depth_from_total_counts_and_constant():
    counts = np.array([[1, 2, 0], [0, 0, 7]], dtype=np.int32)
    adata = cells_with_obs(pd.DataFrame(index=["a", "b"]), counts)

    np.testing.assert_array_equal(sequencing_depth(adata, source="total_counts")[0], [3.0, 7.0])
    np.testing.assert_array_equal(sequencing_depth(adata, source="constant", constant=5e4)[0], [5e4, 5e4])


def test_depth_from_total_counts_rejects_empty_cells():
    counts = np.array([[1, 2, 0], [0, 0, 0]], dtype=np.int32)
    adata = cells_with_obs(pd.DataFrame(index=["a", "b"]), counts)

    with pytest.raises(InputError, match=r"1 cells have zero counts \(first: 'b'\).*load.zero_cells: drop"):
        sequencing_depth(adata, source="total_counts", per_cell=True)


def test_log_offsets_use_median_depth_unless_per_cell():
    depth = np.array([1e5, 2e5, 4e5])
    lengths = np.array([2000.0, 4000.0])

    cell_offset, gene_offset = log_offsets(depth, lengths, per_cell=False)
    per_cell_offset, _ = log_offsets(depth, lengths)

    np.testing.assert_allclose(cell_offset, np.full(3, np.log(2.0)))
    np.testing.assert_allclose(per_cell_offset, [0.0, np.log(2.0), np.log(4.0)])
    np.testing.assert_allclose(gene_offset, [0.0, np.log(2.0)])


def test_covariates_round_trip(tmp_path):
    cells_path, genes_path = tmp_path / "out" / "cells.tsv", tmp_path / "out" / "genes.tsv"
    depth, lengths = np.array([1.5e5, 2.5e5]), np.array([1234.5, 987.0, 2000.0])
    adata = ad.AnnData(
        X=sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int32)),
        obs=pd.DataFrame({"reads": depth}, index=["007", "b"]),
        var=pd.DataFrame({"length": lengths}, index=["G1", "G2", "G3"]),
    )
    settings = {
        "gene_length": {"source": "var", "column": "length", "path": None, "attribute": "gene_id", "var_column": None},
        "depth": {"source": "obs", "column": "reads", "constant": 1e4, "per_cell": True},
        "depth_ref": 1e5, "length_ref": 2000.0, "seed": 0,
    }
    cells, genes = covariate_tables(adata, settings)
    write_covariates(cells, genes, cells_path, genes_path)
    cells, genes = aligned_covariates(cells_path, genes_path, adata)
    cell_offset, gene_offset = cells["log_offset"].to_numpy(), genes["log_offset"].to_numpy()

    assert list(read_covariates(cells_path, genes_path)[0].index) == ["007", "b"]
    np.testing.assert_array_equal(cell_offset, np.log(depth / 1e5))
    np.testing.assert_array_equal(gene_offset, np.log(lengths / 2000.0))
    assert sorted(path.name for path in cells_path.parent.iterdir()) == ["cells.tsv", "genes.tsv"]
    with pytest.raises(InputError, match="gene names differ"):
        aligned_covariates(cells_path, genes_path, adata[:, ::-1])


def test_a_median_depth_of_zero_stops_with_the_cause_and_the_fix():
    """The original "first cells x first genes" slice of the atlas leaves most cells without
    counts: one scalar depth, their median, is 0 and every offset would be -inf."""
    counts = np.zeros((5, 3), dtype=np.int32)
    counts[:2] = [[1, 2, 0], [0, 3, 4]]
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]),
                       var=pd.DataFrame(index=["G1", "G2", "G3"]))
    settings = {
        "gene_length": {"source": "none", "path": None, "attribute": "gene_id", "column": "length"},
        "depth": {"source": "total_counts", "column": "Bases", "constant": 1e4, "per_cell": False},
        "depth_ref": 1e5, "length_ref": 2000.0, "seed": 0,
    }
    with pytest.raises(InputError, match=r"5 of 5 cells get a depth of 0, .*fix: drop cells without counts") as error:
        covariate_tables(adata, settings)
    assert "\n" not in str(error.value)


def test_an_absurd_depth_stops_with_the_cause_and_the_fix():
    adata = ad.AnnData(X=sp.csr_matrix(np.ones((3, 2), dtype=np.int32)), obs=pd.DataFrame(
        {"depth": [1e4, 1e308, 2e4]}, index=["c0", "c1", "c2"]), var=pd.DataFrame(index=["G1", "G2"]))
    settings = {
        "gene_length": {"source": "none", "path": None, "attribute": "gene_id", "column": "length"},
        "depth": {"source": "obs", "column": "depth", "constant": 1e4, "per_cell": True},
        "depth_ref": 1e5, "length_ref": 2000.0, "seed": 0,
    }
    with pytest.raises(InputError, match=r"covariates: depth: 1 of 3 rows .*first: 'c1'.*fix: fix the depth values"):
        covariate_tables(adata, settings)


def test_table_rejects_infinite_lengths(tmp_path):
    path = tmp_path / "lengths.tsv"
    path.write_text("G1\t1000\nG2\tinf\n")
    with pytest.raises(InputError, match=r"1 lengths are not positive, finite numbers \(first: gene 'G2'"):
        gene_lengths_from_table(path, ["G1", "G2"])
