"""Resume is exact or refused: the reader state records its data plan; changed plans re-plan or raise."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tml.reader.dataset import build_dataset
from tml.reader.state import ResumeError

pytestmark = pytest.mark.unit


def _ids(dataset, limit=None) -> list[np.ndarray]:
    out = []
    for batch in dataset:
        out.append(batch.ids["uid"].numpy().copy())
        if limit is not None and len(out) == limit:
            break
    return out


def _config(rd, inputs, **overrides):
    settings = {"global_batch_size": 6, "num_epochs": 3, "shuffle": {"seed": 5, "buffer_size": 12}}
    return rd.base_config(str(inputs), **{**settings, **overrides})


def _epochs(dataset, batches) -> list[np.ndarray]:
    """The rows of each epoch, from a full stream's batches."""
    out, start = [], 0
    for epoch in range(dataset.plan.num_epochs):
        count = dataset.plan_epoch(epoch).num_batches(dataset.plan.batch_size)
        out.append(np.concatenate(batches[start : start + count]))
        start += count
    return out


def test_state_is_json_data_recording_the_plan(files, rd):
    dataset = build_dataset(_config(rd, files), ["click"], rank=1, world_size=2)
    _ids(dataset, limit=4)
    state = dataset.state_dict()
    assert json.loads(json.dumps(state)) == state
    plan = state["plan"]
    assert {k: plan[k] for k in ("global_batch_size", "world_size", "rank", "num_epochs")} == {
        "global_batch_size": 6, "world_size": 2, "rank": 1, "num_epochs": 3
    }  # fmt: skip
    assert plan["shuffle"] == {"seed": 5, "shuffle_files": True, "buffer_size": 12}
    assert plan["inputs"]["root"] == str(files) and plan["inputs"]["num_rows"] == 72
    assert plan["inputs"]["files"][0] == ["a.parquet", [16, 16, 8]]
    assert state["position"]["batches"] == 4 and state == dataset.state_dict(4)
    assert dataset.state_dict(2)["position"] == {"batches": 2, "epoch": 0, "row": 6}


def test_state_dict_of_trained_batches_not_prefetched_ones(files, rd):
    config = _config(rd, files)
    reference = build_dataset(config, ["click"])
    full = _ids(reference)
    dataset = build_dataset(config, ["click"])
    _ids(dataset, limit=9)  # the loop fetched 9 but trained on 7
    resumed = build_dataset(config, ["click"])
    resumed.load_state_dict(json.loads(json.dumps(dataset.state_dict(7))))
    assert resumed.state_dict() == dataset.state_dict(7)  # before iterating: the loaded position
    tail = _ids(resumed)
    assert len(tail) == len(full) - 7 and all(
        np.array_equal(a, b) for a, b in zip(tail, full[7:], strict=True)
    )
    assert resumed.state_dict()["position"]["batches"] == len(full)  # counted from the stream's start
    with pytest.raises(ValueError, match="before the start of this stream"):
        resumed.state_dict(3)
    with pytest.raises(ValueError, match="past the end"):
        resumed.state_dict(len(full) + 1)


def test_changed_global_batch_size_resumes_exactly_by_rows(files, rd, reader_log):
    for world_size in (1, 2):
        for rank in range(world_size):
            small = _config(rd, files)
            reference = build_dataset(small, ["click"], rank=rank, world_size=world_size)
            full = np.concatenate(_ids(reference))
            large = _config(rd, files, global_batch_size=8 * world_size)
            dataset = build_dataset(large, ["click"], rank=rank, world_size=world_size)
            dataset.load_state_dict(reference.state_dict(5))
            assert "global_batch_size 6 -> " in reader_log.text and "exact by rows" in reader_log.text
            batches = _ids(dataset)
            assert all(len(b) <= 8 for b in batches)
            np.testing.assert_array_equal(np.concatenate(batches), full[5 * 6 // world_size :])


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_changed_world_size_replans_the_epoch_and_later_epochs_are_exact(files, rd, reader_log, old, new):
    config = _config(rd, files, global_batch_size=12)
    saved = [build_dataset(config, ["click"], rank=r, world_size=old) for r in range(old)]
    for dataset in saved:
        _ids(dataset)
    n = 4  # every old rank trained 4 batches of 12 // old rows: inside epoch 0 (72 rows over `old` ranks)
    states = [dataset.state_dict(n) for dataset in saved]
    assert {state["position"]["epoch"] for state in states} == {0}
    for all_states in (None, states):
        resumed_rows = []
        for rank in range(new):
            fresh = build_dataset(config, ["click"], rank=rank, world_size=new)
            epochs = _epochs(fresh, _ids(fresh))
            dataset = build_dataset(config, ["click"], rank=rank, world_size=new)
            reader_log.clear()
            dataset.load_state_dict(states[0], all_states=all_states)
            assert f"world size {old} -> {new}: epoch 0 is re-dealt over {new} ranks" in reader_log.text
            assert "later epochs are exact" in reader_log.text
            stream = np.concatenate(_ids(dataset))
            rest = np.concatenate(epochs[1:])
            # The resumed epoch: this rank's new share from the re-planned row; then the later epochs.
            skip = n * 12 // new
            np.testing.assert_array_equal(stream, np.concatenate([epochs[0][skip:], rest]))
            resumed_rows.append(len(epochs[0]) - skip)
            assert dataset.state_dict()["plan"]["world_size"] == new
        assert sum(resumed_rows) == 72 - n * 12  # as many rows of the epoch left as before the change


def test_all_states_count_the_rows_of_old_ranks_already_past_the_epoch(files, rd, reader_log):
    config = _config(rd, files, global_batch_size=4)  # 2 old ranks x 2 rows
    old = [build_dataset(config, ["click"], rank=r, world_size=2) for r in range(2)]
    in_epoch0 = [dataset.plan_epoch(0).num_batches(2) for dataset in old]
    assert in_epoch0[0] != in_epoch0[1]  # the shares of epoch 0 differ: one rank enters epoch 1 first
    n = min(in_epoch0) + 1
    states = [dataset.state_dict(n) for dataset in old]
    ahead = int(np.argmin(in_epoch0))  # the old rank already in epoch 1
    assert [state["position"]["epoch"] for state in states] == [1 if r == ahead else 0 for r in range(2)]
    epoch = states[0]["position"]["epoch"]
    # Rows of old rank 0's epoch that both old ranks had read together.
    if ahead == 0:  # rank 0 is 1 batch into epoch 1, rank 1 has not started it
        read = 2 * (n - in_epoch0[0])
    else:  # rank 0 is in epoch 0 after n batches, rank 1 has read all of its share of epoch 0
        read = 2 * n + old[1].plan_epoch(0).num_rows
    dataset = build_dataset(config, ["click"], rank=0, world_size=1)
    dataset.load_state_dict(states[0], all_states=states)
    assert dataset.state_dict()["position"] == {"batches": n, "epoch": epoch, "row": read}
    assert f"the 2 old ranks had read {read} rows of it" in reader_log.text


def test_all_states_must_be_every_old_rank_in_order(files, rd):
    config = _config(rd, files, global_batch_size=12)
    states = [build_dataset(config, ["click"], rank=r, world_size=2).state_dict(0) for r in range(2)]
    dataset = build_dataset(config, ["click"])
    with pytest.raises(ResumeError, match=r"all_states: expected the states of old ranks 0\.\.1"):
        dataset.load_state_dict(states[0], all_states=states[::-1])
    other = build_dataset(_config(rd, files, global_batch_size=6), ["click"], rank=1, world_size=2)
    with pytest.raises(ResumeError, match="old rank 1's state has another data plan"):
        dataset.load_state_dict(states[0], all_states=[states[0], other.state_dict(0)])


def test_changed_inputs_are_refused_naming_the_files(files, rd, tmp_path):
    dataset = build_dataset(_config(rd, files), ["click"])
    state = dataset.state_dict(3)
    rd.write(files / "e.parquet", 5, 100)
    with pytest.raises(ResumeError, match=r"inputs changed .*1 files added \(e\.parquet\)"):
        build_dataset(_config(rd, files), ["click"]).load_state_dict(state)
    (files / "e.parquet").unlink()
    rd.write(files / "b.parquet", 9, 40)
    (files / "d.parquet").unlink()
    with pytest.raises(
        ResumeError,
        match=r"inputs changed .*1 files removed \(d\.parquet\); 1 files changed \(b\.parquet: 7 rows in 1 "
        r"row groups -> 9 rows in 1 row groups\)",
    ):
        build_dataset(_config(rd, files), ["click"]).load_state_dict(state)


def test_moved_inputs_resume_and_say_so(files, rd, tmp_path, reader_log):
    reference = build_dataset(_config(rd, files), ["click"])
    full = _ids(reference)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in "abcd":
        (moved / f"{name}.parquet").write_bytes((files / f"{name}.parquet").read_bytes())
    dataset = build_dataset(_config(rd, moved), ["click"])
    dataset.load_state_dict(reference.state_dict(4))
    assert f"inputs moved from {files} to {moved}" in reader_log.text
    assert all(np.array_equal(a, b) for a, b in zip(_ids(dataset), full[4:], strict=True))


@pytest.mark.parametrize(
    ("shuffle", "key"),
    [({"seed": 6, "buffer_size": 12}, "shuffle.seed"), ({"seed": 5, "buffer_size": 0}, "shuffle.buffer_size"),
     ({"seed": 5, "buffer_size": 12, "shuffle_files": False}, "shuffle.shuffle_files")],
)  # fmt: skip
def test_changed_shuffle_is_refused_naming_the_key(files, rd, shuffle, key):
    state = build_dataset(_config(rd, files), ["click"]).state_dict(2)
    with pytest.raises(ResumeError, match=rf"{key} changed from"):
        build_dataset(_config(rd, files, shuffle=shuffle), ["click"]).load_state_dict(state)


def test_seed_is_not_part_of_an_unshuffled_plan(files, rd):
    off = {"seed": 1, "shuffle_files": False}
    reference = build_dataset(_config(rd, files, shuffle=off), ["click"])
    full = _ids(reference)
    dataset = build_dataset(_config(rd, files, shuffle={**off, "seed": 2}), ["click"])
    dataset.load_state_dict(reference.state_dict(3))
    assert np.array_equal(_ids(dataset, limit=1)[0], full[3])


def test_rank_mismatch_at_the_same_world_size_is_refused(files, rd):
    state = build_dataset(_config(rd, files), ["click"], rank=0, world_size=2).state_dict(1)
    with pytest.raises(
        ResumeError, match="rank: the reader state was saved by rank 0 but is loaded by rank 1"
    ):
        build_dataset(_config(rd, files), ["click"], rank=1, world_size=2).load_state_dict(state)


def test_changed_num_epochs_inside_or_refused(files, rd, reader_log):
    reference = build_dataset(_config(rd, files), ["click"])
    full = _ids(reference)
    per_epoch = reference.plan_epoch(0).num_batches(6)  # 12
    state = reference.state_dict(per_epoch + 2)  # epoch 1
    for num_epochs, left in ((2, per_epoch - 2), (None, None)):
        dataset = build_dataset(_config(rd, files, num_epochs=num_epochs), ["click"])
        dataset.load_state_dict(state)
        assert f"num_epochs 3 -> {num_epochs}: the position (epoch 1, row 12) is inside" in reader_log.text
        tail = _ids(dataset, limit=None if left else 2 * per_epoch)
        assert np.array_equal(
            np.concatenate(tail[: per_epoch - 2]), np.concatenate(full[per_epoch + 2 : 2 * per_epoch])
        )
        assert left is None or len(tail) == left
    with pytest.raises(
        ResumeError, match="num_epochs changed from 3 to 1, but the saved position is in epoch 1"
    ):
        build_dataset(_config(rd, files, num_epochs=1), ["click"]).load_state_dict(state)
    end = reference.state_dict(len(full))  # a finished stream fits a run of exactly that many epochs
    assert end["position"] == {"batches": len(full), "epoch": 3, "row": 0}
    dataset = build_dataset(_config(rd, files, num_epochs=4), ["click"])
    dataset.load_state_dict(end)
    assert len(_ids(dataset)) == per_epoch  # one more epoch


def test_old_and_malformed_states_are_refused(files, rd):
    dataset = build_dataset(_config(rd, files), ["click"])
    with pytest.raises(ResumeError, match="the old format"):
        dataset.load_state_dict({"batches_yielded": 3})
    with pytest.raises(ValueError, match="expected a dict with version 1"):
        dataset.load_state_dict({"step": 3})
    state = dataset.state_dict(0)
    del state["position"]["row"]
    with pytest.raises(ResumeError, match="malformed"):
        dataset.load_state_dict(state)


def test_plan_summary_shows_mixed_folders_on_rank_0(tmp_path, rd, reader_log):
    for split, count in (("train", 2), ("valid", 1)):
        (tmp_path / split).mkdir()
        for index in range(count):
            rd.write(tmp_path / split / f"part-{index}.parquet", 10, 100 * index)
    (tmp_path / "train" / "_SUCCESS").write_text("")
    config = rd.base_config(str(tmp_path))
    build_dataset(config, ["click"], rank=1, world_size=2)
    assert "3 files" not in reader_log.text
    dataset = build_dataset(config, ["click"], rank=0, world_size=2)
    summary = dataset.plan_summary()
    assert summary in reader_log.text
    assert f"3 files, 30 rows in 3 row groups under {tmp_path}" in summary
    assert "train/part-0.parquet, train/part-1.parquet, valid/part-0.parquet" in summary
    assert (
        "files from 2 folders: train/ (2), valid/ (1)" in summary and "2 ranks x 4 rows per batch" in summary
    )
    many = tmp_path / "many"
    many.mkdir()
    table = rd.make_table(2)
    for index in range(9):
        pq.write_table(table, many / f"p{index}.parquet")
    names = build_dataset(rd.base_config(str(many)), ["click"]).plan_summary()
    assert "(p0.parquet, p1.parquet, p2.parquet, ..., p7.parquet, p8.parquet)" in names


def test_rewritten_row_groups_with_the_same_rows_count_as_a_change():
    from tml.reader.state import InputFiles

    then = InputFiles.of(["/d/a.parquet", "/d/b.parquet"], [[16, 8], [5]])
    now = InputFiles.of(["/d/a.parquet", "/d/b.parquet"], [[8, 16], [5]])
    assert then.changes_since(then) is None and then.root == "/d"
    assert now.changes_since(then) == "1 files changed (a.parquet: rows per row group [16, 8] -> [8, 16])"
