"""Real clients read every output: Hugging Face `datasets` loads each stage's parts of the
session's quickstart run as written (empty parts included), and polars scans them."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

ROW_STAGES = [
    "extract", "langid", "quality", "dedup", "edu_annotate", "edu_score",
    "seeds", "generate", "validate", "synth_dedup", "decontaminate",
]  # fmt: skip


@pytest.mark.parametrize("stage", ROW_STAGES)
def test_datasets_loads_every_stage(quickstart_run, stage, tmp_path):
    import datasets

    run, _ = quickstart_run
    files = sorted((run / stage).glob("*.parquet"))
    assert files, f"{stage} wrote no parts"
    for f in files:  # an empty part has a schema and zero row groups, never a 0-row group
        meta = pq.ParquetFile(f).metadata
        assert all(meta.row_group(i).num_rows > 0 for i in range(meta.num_row_groups))
    expected = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if expected == 0:
        pytest.skip(f"{stage} has no rows in this run")  # datasets refuses an all-empty split
    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], cache_dir=str(tmp_path), split="train"
    )
    assert ds.num_rows == expected
    assert "id" in ds.column_names and "drop_reason" in ds.column_names
