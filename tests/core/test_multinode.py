"""Two "nodes" of one process each, joined by torchrun's c10d rendezvous on this machine: the planner sees two
hosts, and training matches one node of two processes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from torch.distributed import TCPStore

JOB = pathlib.Path(__file__).with_name("torchrun_job.py")


def _torchrun(out: pathlib.Path, nnodes: int, nproc: int, port: int) -> list[subprocess.Popen]:
    # The rendezvous store is this process's (see _run), not a node's: the node whose agent hosts it would
    # take it down on exiting, and an agent still watching its worker then fails on the broken connection
    # (torchrun's teardown race, seen on a loaded 2-core box), as in a cluster with an external store.
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=tml-{port}",
        "--rdzv_conf=is_host=false", str(JOB), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own per node: a hung node is killed with its workers (see _run).
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return [subprocess.Popen(command, env=env, start_new_session=True, **pipes) for _ in range(nnodes)]


def _run(out: pathlib.Path, nnodes: int, nproc: int, port: int) -> list[dict]:
    out.mkdir()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    procs = _torchrun(out, nnodes, nproc, port)
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        logs = [proc.communicate()[0] for proc in procs]
        pytest.fail("a node hung for 300 s; their output:\n" + "\n---\n".join(log[-4000:] for log in logs))
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    del store  # kept until every node has exited
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_plan_two_hosts_and_match_one_node(tmp_path, tcp_port_factory):
    two_nodes = _run(tmp_path / "two_nodes", 2, 1, tcp_port_factory())
    one_node = _run(tmp_path / "one_node", 1, 2, tcp_port_factory())
    assert [r["hosts"] for r in two_nodes] == [2, 2] and [r["env_hosts"] for r in two_nodes] == [2, 2]
    assert [r["hosts"] for r in one_node] == [1, 1]
    # Row-wise within a host: all of table a on the ranks of one host, not across both.
    assert len(two_nodes[0]["table_a_ranks"]) == 1 and one_node[0]["table_a_ranks"] == [0, 1]
    # shutdown() drops the groups torchrec caches: left there, they outlive destroy_process_group.
    for record in two_nodes + one_node:
        assert record["torchrec_groups"] == {"before": [True, True], "after": [None, None]}
    for two, one in zip(two_nodes, one_node, strict=True):
        assert len(two["losses"]) == 4
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
