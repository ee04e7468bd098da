"""The reader's threads run torch ops on one OpenMP thread; the training thread and new threads keep theirs."""

from __future__ import annotations

import threading

import pytest
import torch

from tml.reader.dataset import build_dataset
from tml.reader.ranking import RankingDecoder
from tml.reader.torch_threads import use_one_torch_thread

pytestmark = pytest.mark.unit


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_only_the_calling_thread_gets_one_thread(two_threads):
    def switch():
        took = use_one_torch_thread()
        return took, torch.get_num_threads()

    assert _in_thread(switch) == (True, 1)
    assert torch.get_num_threads() == 2  # this thread
    assert _in_thread(torch.get_num_threads) == 2  # and a thread started afterwards


def test_reader_threads_decode_and_batch_on_one_thread(files, rd, two_threads, monkeypatch):
    seen = []
    decode, to_batch = RankingDecoder.decode, RankingDecoder.to_batch

    def recording(method):
        def wrapped(self, *args):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return method(self, *args)

        return wrapped

    monkeypatch.setattr(RankingDecoder, "decode", recording(decode))
    monkeypatch.setattr(RankingDecoder, "to_batch", recording(to_batch))
    batches = list(build_dataset(rd.base_config(str(files), global_batch_size=4), ["click"]))
    assert batches and seen
    assert {name.split("_")[0] for name, _ in seen} == {"tml-reader-decode", "tml-reader-driver"}
    assert all(count == 1 for _, count in seen), seen
    assert torch.get_num_threads() == 2
