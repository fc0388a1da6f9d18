"""launch/pod_trials.py's measurements produce rows with the fields the docs quote."""

import pytest

from lsync_jax.tools import pod_trials


def test_storage_rows_on_a_local_disk(tmp_path):
    rows = pod_trials.storage_rows(str(tmp_path), repeats=3, large_mb=1)
    assert [r["what"] for r in rows] == ["write 1 KiB", "read 1 KiB", "exists", "write+read+delete 1 KiB (the write "
                                         "probe)", "write 1 MiB", "read 1 MiB"]
    assert all(r["median_ms"] > 0 for r in rows) and rows[-1]["MB_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the objects it wrote are removed


@pytest.mark.gcs
def test_storage_rows_in_a_bucket(bucket):
    rows = pod_trials.storage_rows(f"{bucket}/rt", repeats=2, large_mb=1)
    assert len(rows) == 6 and all(r["where"] == f"{bucket}/rt" for r in rows)


@pytest.mark.slow
@pytest.mark.multihost
def test_preemption_rows_stop_both_processes_at_one_step():
    (row,) = pod_trials.preemption_rows(step_times=(0.05,), calls=1000)
    assert row["same_step"] and row["steps_after_signal"] >= 1 and row["sync_point_call_us"] > 0
