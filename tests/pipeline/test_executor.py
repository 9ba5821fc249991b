"""Executors: the same work gives the same output in this process, in a pool of local
processes and on Ray, whatever the number of workers or the order results come back in."""

from __future__ import annotations

import functools
import operator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.executor import LOCAL, ProcessExecutor, RayExecutor
from pipeline.stage_runner import output_files, run_stage
from tests.conftest import fineweb_docs, write_jsonl_parts
from tests.pipeline.test_thresholds import LengthStage


def test_every_executor_maps_every_item_once(ray_session):
    triple = functools.partial(operator.mul, 3)
    expect = [3 * i for i in range(20)]
    assert list(LOCAL.map(triple, range(20))) == expect
    assert sorted(ProcessExecutor(3).map(triple, range(20))) == expect
    assert sorted(RayExecutor().map(triple, range(20), uses_model=True)) == expect
    assert sorted(RayExecutor().map(triple, range(20))) == expect


def test_a_stage_writes_the_same_parts_with_one_or_three_workers(tmp_path):
    files = [str(p) for p in write_jsonl_parts(tmp_path / "in", fineweb_docs(90), 4)]
    runs = {}
    for label, executor in (("one", LOCAL), ("three", ProcessExecutor(3))):
        m = run_stage(LengthStage(), files, tmp_path / label, executor)
        assert m["executor"] == executor.name and m["parts"] == 4
        runs[label] = pa.concat_tables(
            pq.read_table(f) for f in output_files(tmp_path / label / "length")
        )
    assert runs["one"].equals(runs["three"])
