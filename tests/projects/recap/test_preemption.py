"""SIGTERM to a 2-rank training run saves one checkpoint and every process exits 0 without a traceback: sent
to the launcher (`tml-torchrun`, which forwards it to the workers) and sent to one worker (plain torchrun)."""

import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest

from tml.core.config.loader import load_config
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.data.synthetic import generate

pytestmark = pytest.mark.distributed
MLP = str(pathlib.Path(__file__).resolve().parents[3] / "projects/home/recap/config/examples/model_mlp.yaml")
ENDLESS = [
    "training.num_train_steps=1000000",
    "training.checkpoint_every_n=1000000",
    "training.train_log_every_n=1",
    "train_data.global_batch_size=16",
]


def _train_until_signalled(data, runs, launcher: list[str], signal_worker: bool) -> tuple[int, str]:
    env = {**os.environ, "TML_DATA": str(data), "TML_RUNS": str(runs)}
    env.pop("TML_DEBUG", None)
    command = [*launcher, "--standalone", "--nproc_per_node=2", "-m", "tml.projects.home.recap.main", "train"]
    process = subprocess.Popen(
        [*command, "--config", MLP, *ENDLESS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    trained = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if " step 3: " in line:  # the loop runs, so the stop-request handlers are installed
                trained.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert trained.wait(120), "".join(lines)
        if signal_worker:
            workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
            os.kill(int(workers.stdout.split()[-1]), signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        code = process.wait(120)
    finally:
        process.kill()
    reader.join(10)
    return code, "".join(lines)


def test_sigterm_saves_once_and_every_process_exits_0(tmp_path):
    config = load_config(RecapConfig, MLP, env={"TML_DATA": str(tmp_path / "data")})
    for split, data in enumerate([config.train_data, config.validation_data["valid"]]):
        generate(
            data,
            400,
            str(tmp_path / "data/model_mlp" / ("train", "valid")[split]),
            num_files=2,
            progress=False,
        )
    launchers = {
        "launcher": ([sys.executable, "-m", "tml.core.launch"], False),
        "worker": ([sys.executable, "-m", "torch.distributed.run"], True),
    }
    for name, (launcher, signal_worker) in launchers.items():
        code, out = _train_until_signalled(tmp_path / "data", tmp_path / name, launcher, signal_worker)
        assert code == 0, out  # the launcher's status is the workers': 0 only when both exited 0
        assert "Traceback" not in out and "SignalException" not in out, out
        assert out.count("saved checkpoint") == 1 and out.count("stopping after the checkpoint") == 1, out
        saved = sorted(p.name for p in (tmp_path / name / "model_mlp/checkpoints").iterdir())
        assert len(saved) == 1 and saved[0].startswith("step-"), saved
