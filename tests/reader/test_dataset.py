"""ParquetDataset: batch contents, epochs, shuffling, resume, file systems, background threads."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref

import fsspec
import numpy as np
import pytest
import torch

from tml.reader import pipeline
from tml.reader.config import ValidationDataConfig
from tml.reader.dataset import build_dataset, build_eval_dataset

pytestmark = pytest.mark.unit


def test_batch_contents_exact(files, rd):
    config = rd.base_config(
        str(files / "*.parquet"),
        dense_columns=[{"name": "ab", "columns": ["a", "b"]}],
        weight_column="w",
        tasks={"fav": {"neg_downsampling_rate": 0.5}, "click": {"pos_downsampling_rate": 0.25}},
        shuffle={"shuffle_files": False},
    )
    dataset = build_dataset(config, ["fav", "click"])
    batches = list(dataset)
    assert [b.batch_size for b in batches] == [8] * 9  # 72 rows
    uid = rd.all_ids(batches)
    np.testing.assert_array_equal(uid, np.arange(72))  # file order, row-group order, nothing dropped
    dense = {name: torch.cat([b.dense[name] for b in batches]) for name in ("continuous", "binary", "ab")}
    u = torch.from_numpy(uid)
    torch.testing.assert_close(dense["continuous"], (u[:, None] * 10 + torch.arange(6)).float())
    torch.testing.assert_close(dense["binary"], ((u[:, None] >> torch.arange(4)) & 1).float())
    torch.testing.assert_close(dense["ab"], torch.stack([u * 0.5, (u % 5).double()], 1).float())
    labels = torch.cat([b.labels for b in batches])
    torch.testing.assert_close(labels, torch.stack([(u % 3 == 0), (u % 2)], 1).float())  # by name
    downsampling = torch.stack(
        [labels[:, 0] + (1 - labels[:, 0]) / 0.5, labels[:, 1] / 0.25 + 1 - labels[:, 1]], 1
    )
    weights = torch.cat([b.weights for b in batches])
    torch.testing.assert_close(
        weights, (1 + u % 3).float()[:, None].expand(-1, 2)
    )  # training: not reweighted
    # A validation partition of the same files: one pass in file order, reweighted by the inverse rates.
    shared = config.model_dump(exclude={"shuffle", "num_epochs", "id_columns"})
    partition = build_eval_dataset(ValidationDataConfig.model_validate(shared), ["fav", "click"])
    weights = torch.cat([b.weights for b in partition])
    torch.testing.assert_close(weights, downsampling * (1 + u % 3).float()[:, None])
    assert all(b.sparse is None for b in batches) and batches[0].dense["continuous"].dtype == torch.float32
    assert dataset.stats["files"] == 4 and dataset.stats["rows"] == 72 and dataset.stats["batches"] == 9


def test_training_weights_not_reweighted_and_partial_last_batch(files, rd):
    config = rd.base_config(str(files), global_batch_size=10, tasks={"click": {"neg_downsampling_rate": 0.1}})
    batches = list(build_dataset(config, ["click"]))
    assert [b.batch_size for b in batches] == [10] * 7 + [2]
    assert all(torch.equal(b.weights, torch.ones(b.batch_size, 1)) for b in batches)


def test_truncation_and_mask(tmp_path, files, rd):
    np.save(tmp_path / "mask.npy", np.array([3, 0]))
    config = rd.base_config(
        str(files / "*.parquet"),
        preprocess={"truncate_and_slice": {"continuous_feature_truncation": 4,
                                           "continuous_feature_mask_path": str(tmp_path / "mask.npy")}},
        shuffle={"shuffle_files": False},
    )  # fmt: skip
    batch = next(iter(build_dataset(config, ["click"])))
    u = batch.ids["uid"].float()[:, None]
    torch.testing.assert_close(batch.dense["continuous"], torch.cat([u * 10 + 3, u * 10], 1))


def _stream(dataset, limit=None):
    out = []
    for batch in dataset:
        out.append(batch.ids["uid"].numpy().copy())
        if limit is not None and len(out) == limit:
            break
    return out


def test_shuffle_deterministic_per_seed_and_epoch(files, rd):
    config = rd.base_config(str(files), num_epochs=2, shuffle={"seed": 3, "buffer_size": 20})
    first = _stream(build_dataset(config, ["click"]))
    again = _stream(build_dataset(config, ["click"]))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    epoch0, epoch1 = np.concatenate(first[:9]), np.concatenate(first[9:])
    assert sorted(epoch0) == sorted(epoch1) == list(range(72))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(72))
    other = np.concatenate(_stream(build_dataset(config.model_copy(update={"shuffle": config.shuffle.model_copy(
        update={"seed": 4})}), ["click"]))[:9])  # fmt: skip
    assert not np.array_equal(epoch0, other)
    plain = np.concatenate(_stream(build_dataset(config, ["click"], shuffle=False, num_epochs=1)))
    np.testing.assert_array_equal(plain, np.arange(72))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_exactly_without_decoding_the_past(files, rd, world_size):
    config = rd.base_config(str(files), global_batch_size=6, num_epochs=4, shuffle={"buffer_size": 20})
    for rank in range(world_size):
        reference = build_dataset(config, ["click"], rank=rank, world_size=world_size)
        full = _stream(reference)
        for n in (0, 5, len(full) // 2, len(full) - 1, len(full)):
            dataset = build_dataset(config, ["click"], rank=rank, world_size=world_size)
            dataset.load_state_dict(reference.state_dict(n))
            tail = _stream(dataset, limit=1)
            assert (not tail) if n == len(full) else np.array_equal(tail[0], full[n])
            if n == len(full) - 1:  # in the last epoch: the 3 epochs before (>= 108 rows) were not decoded
                assert 0 < dataset.stats["rows_read"] < 80
            assert dataset.state_dict() == reference.state_dict(n + len(tail))


def test_state_dict_counts_and_next_iter_restarts(files, rd):
    dataset = build_dataset(rd.base_config(str(files), num_epochs=None), ["click"])
    assert dataset.num_batches() is None
    first = _stream(dataset, limit=11)
    assert (
        dataset.state_dict() == dataset.state_dict(11) and dataset.state_dict()["position"]["batches"] == 11
    )
    # 72 rows, batches of 8: batch 11 is the third of epoch 1.
    assert dataset.state_dict()["position"] == {"batches": 11, "epoch": 1, "row": 16}
    np.testing.assert_array_equal(_stream(dataset, limit=1)[0], first[0])  # a fresh iter() starts over
    dataset.load_state_dict(dataset.state_dict(10))
    np.testing.assert_array_equal(_stream(dataset, limit=1)[0], first[10])


def test_fsspec_urls(files, rd):
    memory = fsspec.filesystem("memory")
    for name in ("a", "b"):
        memory.pipe(f"/reader-test/{name}.parquet", (files / f"{name}.parquet").read_bytes())
    for inputs in ("memory://reader-test/*.parquet", f"file://{files}/*.parquet", "memory://reader-test"):
        uids = rd.all_ids(list(build_dataset(rd.base_config(inputs), ["click"], shuffle=False)))
        assert len(uids) == (72 if inputs.startswith("file") else 47)
        assert sorted(uids) == sorted(set(uids))


def test_missing_protocol_names_the_extra(rd):
    try:
        import s3fs  # noqa: F401

        pytest.skip("s3fs is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'tml\[s3\]'"):
        build_dataset(rd.base_config("s3://bucket/train/*.parquet"), ["click"])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        build_dataset(rd.base_config("/nonexistent-dir/*.parquet"), ["click"])


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("tml-reader") and t.is_alive()]


def test_threads_stop_on_close_and_gc(files, rd):
    config = rd.base_config(str(files), num_epochs=None, global_batch_size=2, prefetch_batches=2)
    dataset = build_dataset(config, ["click"])
    iterator = iter(dataset)
    next(iterator)
    assert _reader_threads()
    iterator.close()
    assert not [t for t in _reader_threads() if t.name == "tml-reader-driver"]
    iterator = iter(dataset)
    next(iterator)
    del iterator
    gc.collect()
    assert not [t for t in _reader_threads() if t.name == "tml-reader-driver"]
    # One left open and referenced is closed by the atexit hook, before the interpreter finalizes.
    iterator = iter(dataset)
    next(iterator)
    pipeline._close_open_iterators()
    assert not [t for t in _reader_threads() if t.name == "tml-reader-driver"]


def test_dense_only_does_not_import_torchrec(files, rd):
    code = (
        "import sys, json\n"
        "from tml.reader.config import DataConfig\n"
        "from tml.reader.dataset import build_dataset\n"
        f"config = DataConfig(inputs={str(files)!r}, global_batch_size=8, dense_columns="
        "[{'name': 'ab', 'columns': ['a', 'b']}], num_epochs=1)\n"
        "n = sum(b.batch_size for b in build_dataset(config, ['click']))\n"
        "assert n == 72, n\n"
        "assert 'torchrec' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_cost_per_batch_counts_the_reading_threads(files, rd):
    dataset = build_dataset(rd.base_config(str(files)), ["click"])
    assert dataset.cpu_seconds_per_batch() is None  # nothing decoded yet
    rows = sum(batch.batch_size for batch in dataset)
    cost = dataset.cpu_seconds_per_batch()
    # Every row decoded once, and its CPU time counted: a positive cost, far from a second per tiny batch.
    assert dataset._source.cpu.rows == rows and 0 < cost < 1.0


def test_inline_decoding_yields_the_threads_stream_in_the_calling_thread(files, rd):
    def stream(workers):
        config = rd.base_config(str(files), num_workers=workers, shuffle={"seed": 1, "buffer_size": 16})
        dataset = build_dataset(config, ["click"])
        batches = list(dataset)
        return dataset, [
            (b.ids["uid"].tolist(), b.labels.tolist(), b.dense["continuous"].tolist()) for b in batches
        ]

    threads, expected = stream(2)
    before = set(_reader_threads())
    dataset, inline = stream(0)
    assert inline == expected
    assert set(_reader_threads()) <= before  # no thread of its own
    # Its CPU time is counted too (the training process sizes torch's threads by it), per decoded row.
    assert dataset._source.cpu.rows == threads._source.cpu.rows == 72
    assert 0 < dataset.cpu_seconds_per_batch() < 1.0
    iterator = iter(dataset)
    next(iterator)
    iterator.close()
    with pytest.raises(StopIteration):
        next(iterator)


def test_a_batch_the_consumer_dropped_is_freed_mid_window(files, rd):
    # The stream keeps no batch it handed out: a decoding process's slot, and a window's memory, are freed
    # with their last view.
    config = rd.base_config(
        str(files), num_workers=0, global_batch_size=2, shuffle={"seed": 1, "buffer_size": 16}
    )
    iterator = iter(build_dataset(config, ["click"]))
    batch = next(iterator)
    taken = weakref.ref(batch)
    del batch
    assert taken() is None
    next(iterator)  # the same window goes on
    iterator.close()
