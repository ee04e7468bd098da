"""A short tiny-model training run for torchrun launches (tests/core/test_multinode.py): writes this rank's
losses, the hosts the planner saw and where table `a` went to `<out>/rank<r>.json`.

    torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT \
        tests/core/torchrun_job.py OUT
"""

import faulthandler
import importlib.util
import json
import pathlib
import sys

WATCHDOG_S = 150  # a normal run takes 15-25 s

_spec = importlib.util.spec_from_file_location(
    "tiny_model", pathlib.Path(__file__).with_name("tiny_model.py")
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def main(out: str) -> None:
    # A hung rank prints every thread's stack and exits, well before the test's timeout: the failure shows
    # where it hung.
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    import torchrec.distributed.comm as comm

    from tml.core.distributed import init_distributed, shutdown
    from tml.core.train_loop import LoopOptions, train

    env = init_distributed("gloo", "cpu")
    # table_row_wise cuts a table across the ranks of one host: the placement shows the hosts the planner saw.
    sharded, optimizer, scheduler = tiny.build_training(env, shardings={"a": ("table_row_wise", None)})
    result = train(sharded.module, [optimizer], scheduler, tiny.rank_batches(env, 0, 100), env,
                   LoopOptions(num_train_steps=4))  # fmt: skip
    placement = next(p["a"] for p in sharded.plan.plan.values() if "a" in p)
    record = {
        "losses": result.losses,
        "hosts": sharded.num_hosts,
        "env_hosts": env.num_hosts,
        "table_a_ranks": sorted(placement.ranks),
    }
    cached = (comm._INTRA_PG, comm._CROSS_PG)  # table_row_wise makes torchrec cache these two groups
    shutdown()
    record["torchrec_groups"] = {
        "before": [g is not None for g in cached],
        "after": [comm._INTRA_PG, comm._CROSS_PG],
    }
    pathlib.Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(sys.argv[1])
