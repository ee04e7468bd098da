"""Checkpoints: kill + resume equals an uninterrupted run (dropout included: random generators are part of
the checkpoint), interrupted saves are ignored, 2 <-> 1 rank resharding, warm start with an added table and
a changed layer."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import signal

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "tiny_model", pathlib.Path(__file__).with_name("tiny_model.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

SHARDING = {"a": ("table_wise", None), "b": ("row_wise", None)}


def _snapshot(sharded) -> dict:
    from tml.core.state import model_state
    from tml.core.tables import gather_full_table

    state = {k: v.detach().clone() for k, v in model_state(sharded.module).items() if k.startswith("mlp")}
    for table in ("a", "b", "c"):
        if any(k.endswith(f"embedding_bags.{table}.weight") for k in model_state(sharded.module)):
            state[table] = gather_full_table(sharded.module, table)
    return state


def _job(save_dir: str, steps: int, kill_at: int | None) -> dict:
    """One training run that resumes from save_dir; SIGKILLs itself after step `kill_at`."""
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    # Dropout: the resumed run must continue the random stream exactly, not only the weights.
    sharded, optimizer, scheduler = tiny.build_training(env, shardings=SHARDING, dropout=0.3)
    stream = tiny.RankStream(env, 1000)
    ckpt, loop = tiny.checkpointer(save_dir, env, sharded, optimizer, scheduler, 3, stream)
    ckpt.restore_latest()
    start = loop.step

    def maybe_kill(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    options = LoopOptions(num_train_steps=steps, eval_every_n=1)
    train(sharded.module, [optimizer], scheduler, stream, env, options, None, ckpt, maybe_kill, loop)
    result = {"start": start, **_snapshot(sharded)}
    shutdown()
    return result


@pytest.mark.distributed
def test_kill_and_resume_matches_uninterrupted(run_ranks, tmp_path):
    (full,) = run_ranks(_job, 1, str(tmp_path / "full"), 6, None)
    with pytest.raises(AssertionError, match="exit -9"):
        run_ranks(_job, 1, str(tmp_path / "cut"), 6, 4)
    # An interrupted save of step 5 (no marker, or still in its temp folder) must not count.
    checkpoints = tmp_path / "cut" / "checkpoints"
    (checkpoints / "step-5").mkdir()
    (checkpoints / ".tmp-step-5").mkdir()
    (resumed,) = run_ranks(_job, 1, str(tmp_path / "cut"), 6, None)
    assert resumed["start"] == 3
    assert full.keys() == resumed.keys() and {"a", "b", "mlp.0.weight"} <= full.keys()
    for key, value in full.items():
        if key != "start":
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


@pytest.mark.unit
def test_complete_steps_ignores_unfinished(tmp_path):
    from tml.core.checkpoint import MARKER, complete_steps, resolve_checkpoint

    for name, done in [("step-2", True), ("step-10", True), ("step-12", False), (".tmp-step-14", True)]:
        (tmp_path / name).mkdir()
        if done:
            (tmp_path / name / MARKER).touch()
    assert complete_steps(str(tmp_path)) == [2, 10]
    assert resolve_checkpoint(str(tmp_path)).endswith("step-10")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "step-12"))


def _reshard_job(save_dir: str, steps: int) -> dict:
    """Resume from save_dir at this world size, train to `steps`, save, and report weights before/after."""
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    sharded, optimizer, scheduler = tiny.build_training(env, shardings=SHARDING)
    ckpt, loop = tiny.checkpointer(save_dir, env, sharded, optimizer, scheduler, 2)
    ckpt.restore_latest()
    start = loop.step
    loaded = _snapshot(sharded)
    lr_after_load = optimizer.param_groups[0]["lr"]
    batches = tiny.rank_batches(env, 100 + start, 1000)
    options = LoopOptions(num_train_steps=steps)
    train(sharded.module, [optimizer], scheduler, batches, env, options, None, ckpt, state=loop)
    result = {"start": start, "loaded": loaded, "final": _snapshot(sharded), "lr": lr_after_load}
    result["ddp"] = any(
        isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in sharded.module.modules()
    )
    if env.world_size == 1 and start > 0:
        result["warm"] = _warm_start(env, save_dir)
    shutdown()
    return result


def _warm_start(env, save_dir: str) -> dict:
    from tml.core.checkpoint import warm_start

    # Table c is new; a third table widens the MLP's input, so mlp.0 changes shape while mlp.2 keeps it.
    sharded, _, _ = tiny.build_training(env, tables=("a", "b", "c"))
    fresh_c = _snapshot(sharded)["c"]
    fresh = warm_start(sharded.module, save_dir)
    return {"fresh": fresh, "fresh_c": fresh_c, **_snapshot(sharded)}


@pytest.mark.distributed
def test_reshard_one_two_one_and_warm_start(run_ranks, tmp_path):
    save_dir = str(tmp_path / "run")
    (one,) = run_ranks(_reshard_job, 1, save_dir, 2)
    two = run_ranks(_reshard_job, 2, save_dir, 4)
    (back,) = run_ranks(_reshard_job, 1, save_dir, 6)
    assert [one["start"], two[0]["start"], back["start"]] == [0, 2, 4]
    # One rank skips DDP around the dense part; checkpoints still move between the two layouts.
    assert [one["ddp"], two[0]["ddp"], back["ddp"]] == [False, True, False]
    for rank_result in two:
        for key, value in one["final"].items():
            torch.testing.assert_close(rank_result["loaded"][key], value, rtol=0, atol=0)
        assert rank_result["lr"] == pytest.approx(0.05)  # the ramp's end: the scheduler was restored
    for key, value in two[0]["final"].items():
        torch.testing.assert_close(back["loaded"][key], value, rtol=0, atol=0)
    assert not torch.equal(two[0]["final"]["a"], one["final"]["a"])  # training moved the table

    warm = back["warm"]
    assert sorted(warm["fresh"]) == ["ebc.embedding_bags.c.weight", "mlp.0.weight"]
    torch.testing.assert_close(warm["a"], back["final"]["a"], rtol=0, atol=0)
    torch.testing.assert_close(warm["mlp.2.weight"], back["final"]["mlp.2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(warm["c"], warm["fresh_c"], rtol=0, atol=0)


def _sigterm_job(save_dir: str) -> dict:
    """Rank 1 gets SIGTERM after step 3: every rank saves one checkpoint at the same step and exits 0."""
    from tml.core.checkpoint import Preempted
    from tml.core.distributed import init_distributed, shutdown
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    sharded, optimizer, scheduler = tiny.build_training(env, shardings=SHARDING)
    ckpt, loop = tiny.checkpointer(save_dir, env, sharded, optimizer, scheduler, 100)

    def signal_rank_one(step):
        if step == 3 and env.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    options = LoopOptions(num_train_steps=20, eval_every_n=1)
    before = signal.getsignal(signal.SIGTERM)
    try:
        batches = tiny.rank_batches(env, 0, 1000)
        with ckpt.signal_handlers():
            train(sharded.module, [optimizer], scheduler, batches, env, options, None, ckpt, signal_rank_one,
                  loop)  # fmt: skip
        result = {"preempted": False}
    except Preempted as stop:
        result = {"preempted": True, "code": stop.code}
    result["handler_restored"] = signal.getsignal(signal.SIGTERM) is before
    result["latest"] = ckpt.latest_step()
    shutdown()
    return result


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_every_rank_after_one_checkpoint(run_ranks, tmp_path):
    results = run_ranks(_sigterm_job, 2, str(tmp_path / "run"))
    assert [r["preempted"] for r in results] == [True, True]
    assert {r["code"] for r in results} == {0}
    # Left installed, the handler would keep the checkpointer, the model and its process groups alive.
    assert [r["handler_restored"] for r in results] == [True, True]
    # The agreement travels one batch ahead: the stop lands within two steps of the signal, on both ranks.
    latest = {r["latest"] for r in results}
    assert len(latest) == 1 and 4 <= latest.pop() <= 5
