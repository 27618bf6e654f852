"""bs.io.read_bulk: samples × genes tables into AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bitro_sc as bs
from bitro_sc import _keys as K


@pytest.fixture
def bulk_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ["S1", "S2", "S3"],
            "patient_id": ["P1", "P1", "P2"],
            "ERBB2": [10, 0, 7],
            "EPCAM": [3, 4, 5],
            "COL1A2": [0, 12, 1],
        }
    )


@pytest.mark.parametrize("fmt", ["csv", "tsv", "tsv.gz", "parquet", "frame"])
def test_every_format_gives_the_same_anndata(bulk_df, tmp_path, fmt):
    if fmt == "frame":
        source = bulk_df
    else:
        source = tmp_path / f"bulk.{fmt}"
        if fmt == "parquet":
            bulk_df.to_parquet(source, index=False)
        else:
            bulk_df.to_csv(source, sep="," if fmt == "csv" else "\t", index=False)
    adata = bs.io.read_bulk(source)
    assert list(adata.obs_names) == ["S1", "S2", "S3"]
    assert list(adata.var_names) == ["ERBB2", "EPCAM", "COL1A2"]
    assert list(adata.obs[K.SAMPLE_ID]) == ["S1", "S2", "S3"]
    assert list(adata.obs[K.PATIENT_ID]) == ["P1", "P1", "P2"]
    np.testing.assert_array_equal(adata.X, bulk_df[["ERBB2", "EPCAM", "COL1A2"]].to_numpy())
    assert adata.X.dtype == np.int64


def test_index_as_sample_ids_tpm_floats_and_no_patient(tmp_path):
    df = pd.DataFrame({"A": [1.5, 2.0], "B": [0.0, 3.25]}, index=pd.Index(["x", "y"], name="case"))
    df.to_csv(tmp_path / "tpm.csv")
    for source in (df, tmp_path / "tpm.csv"):
        adata = bs.io.read_bulk(source)
        assert list(adata.obs_names) == ["x", "y"]
        assert adata.X.dtype == np.float64
        np.testing.assert_array_equal(adata.X, df.to_numpy())
        assert adata.obs[K.PATIENT_ID].isna().all()


def test_custom_sample_key_and_obs_columns(bulk_df):
    df = bulk_df.rename(columns={"sample_id": "case"}).assign(subtype=["HER2", "HER2", "LumA"])
    adata = bs.io.read_bulk(df, sample_key="case", obs_columns=["subtype"])
    assert list(adata.obs_names) == ["S1", "S2", "S3"]
    assert list(adata.obs["subtype"]) == ["HER2", "HER2", "LumA"]
    assert "subtype" not in adata.var_names


def test_bulk_round_trips_through_h5ad(bulk_df, tmp_path):
    import anndata as ad

    adata = bs.io.read_bulk(bulk_df)
    adata.write_h5ad(tmp_path / "b.h5ad")
    back = ad.read_h5ad(tmp_path / "b.h5ad")
    np.testing.assert_array_equal(back.X, adata.X)
    pd.testing.assert_frame_equal(back.obs, adata.obs)


def test_duplicate_samples_are_named(bulk_df):
    bulk_df.loc[2, "sample_id"] = "S1"
    with pytest.raises(ValueError, match=r"Duplicate sample ids in the bulk table: \['S1'\]"):
        bs.io.read_bulk(bulk_df)


def test_duplicate_genes_are_summed_with_a_warning(bulk_df, tmp_path):
    bulk_df.to_csv(tmp_path / "b.csv", index=False)
    text = (tmp_path / "b.csv").read_text().replace("COL1A2", "EPCAM", 1)
    (tmp_path / "b.csv").write_text(text)
    with pytest.warns(UserWarning, match=r"\['EPCAM'\]\); their counts are summed"):
        adata = bs.io.read_bulk(tmp_path / "b.csv")
    assert list(adata.var_names) == ["ERBB2", "EPCAM"]
    expected = (bulk_df["EPCAM"] + bulk_df["COL1A2"]).to_numpy()
    assert adata[:, "EPCAM"].X.ravel().tolist() == expected.tolist()


def test_non_numeric_values_are_named(bulk_df):
    bulk_df["EPCAM"] = bulk_df["EPCAM"].astype(object)
    bulk_df.loc[1, "EPCAM"] = "high"
    with pytest.raises(ValueError, match=r"gene column\(s\) \['EPCAM'\] \(e\.g\. sample 'S2': 'high'\)"):
        bs.io.read_bulk(bulk_df)


def test_negative_and_missing_values_are_named(bulk_df):
    bad = bulk_df.assign(ERBB2=[1, -2, 3])
    with pytest.raises(ValueError, match=r"1 negative value.*sample 'S2', gene 'ERBB2'"):
        bs.io.read_bulk(bad)
    bad = bulk_df.assign(COL1A2=[1.0, 2.0, np.nan])
    with pytest.raises(ValueError, match=r"missing \(NaN\).*sample 'S3', gene 'COL1A2'"):
        bs.io.read_bulk(bad)


def test_missing_file_and_unknown_obs_column(tmp_path, bulk_df):
    with pytest.raises(FileNotFoundError, match="bulk expression file"):
        bs.io.read_bulk(tmp_path / "none.csv")
    with pytest.raises(ValueError, match=r"`obs_columns` \['stage'\]"):
        bs.io.read_bulk(bulk_df, obs_columns=["stage"])
