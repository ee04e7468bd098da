"""The calibrate and plan modes of `tml-recap`: their help, their flags and what each runs (docs/platform.md).

`main.py` adds these to its parser and dispatches to `run_mode`.
"""

from __future__ import annotations

import argparse

MODES = {
    "calibrate": "fit an isotonic calibration per task on a validation partition (<run>/calibration/step-N.json)",
    "plan": "run the config's plan: its phases in order, skipping those already done",
}
ARGS = {  # mode -> (flags, argparse keywords)
    "calibrate": [("--checkpoint", {"help": "a step-N folder or a run folder (default: save_dir's latest)"}),
                  ("--partition", {"help": "validation_data partition to fit on (default: calibration.partition, "
                                           "else the first)"})],
}  # fmt: skip


def run_mode(args: argparse.Namespace, config) -> None:
    """Run calibrate or plan with the loaded `config`, on every rank of the job."""
    from tml.core.distributed import run_distributed

    if args.mode == "calibrate":
        from tml.projects.home.recap.calibration import calibrate_checkpoint

        run_distributed(lambda: calibrate_checkpoint(config, args.checkpoint, args.partition))
    elif args.mode == "plan":
        from tml.projects.home.recap.plan import run_plan

        run_distributed(lambda: run_plan(config))
