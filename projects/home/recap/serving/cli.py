"""The export / serve / score modes of `tml-recap`: their help, their flags and what each runs.

`main.py` adds these to its parser and dispatches to `run_mode`; serve and score read the artifact's own
config, so they take no `--config`.
"""

from __future__ import annotations

import argparse

MODES = {
    "export": "a checkpoint -> a self-contained artifact (torch.export / AOTInductor program + schema)",
    "serve": "HTTP prediction service of an artifact (POST /predict, /healthz, /readyz, /metrics)",
    "score": "offline batch scoring of Parquet with an artifact (the columns predict writes)",
}
ARTIFACT_MODES = ("serve", "score")  # no --config, no overrides


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


_RUNTIME = (
    "--runtime",
    {
        "choices": ["auto", "aoti", "exported_program"],
        "default": "auto",
        "help": "auto: the AOTInductor package when it loads here, else the exported program",
    },
)
ARGS = {  # mode -> (flags, argparse keywords)
    "export": [("--checkpoint", {"help": "a step-N folder or a run folder (default: save_dir's latest)"}),
               ("--output", {"required": True, "help": "artifact folder to write"}),
               ("--part", {"help": "comma-separated split-tower groups (e.g. user): export only their "
                                   "embeddings instead of the ranker"}),
               ("--compile", {"choices": ["auto", "aoti", "none"], "default": "auto",
                              "help": "auto: AOTInductor, else the exported program; aoti: must compile; none: skip"}),
               ("--overwrite", {"action": "store_true", "help": "replace a non-empty --output"})],
    "serve": [("--artifact", {"required": True, "help": "artifact folder from `tml-recap export`"}),
              ("--host", {"default": "127.0.0.1", "help": "address to listen on (0.0.0.0: every interface)"}),
              ("--port", {"type": int, "default": 8080, "help": "port (0: any free port, logged)"}),
              ("--max-batch-records", {"type": _positive, "default": 1024, "help": "rows per model call at most"}),
              ("--max-wait-ms", {"type": float, "default": 2.0,
                                 "help": "how long a batch waits for more requests after its first"}),
              ("--max-request-records", {"type": _positive, "default": 1024, "help": "rows per request at most"}),
              ("--max-request-bytes", {"type": _positive, "default": 64 << 20, "help": "body bytes per request at most"}),
              ("--drain-seconds", {"type": float, "default": 30.0,
                                   "help": "on SIGTERM, how long requests in flight may take to finish"}),
              ("--threads", {"type": _positive, "help": "torch threads of the model (default: OMP_NUM_THREADS, "
                                                        "else the cores minus one for decoding requests)"}),
              _RUNTIME],
    "score": [("--artifact", {"required": True, "help": "artifact folder from `tml-recap export`"}),
              ("--input", {"required": True, "help": "Parquet glob, folder, file or fsspec URL to score"}),
              ("--output", {"required": True, "help": "output folder (part-00000.parquet)"}),
              ("--batch-size", {"type": _positive, "default": 4096, "help": "rows per model call"}),
              ("--overwrite", {"action": "store_true", "help": "replace part files already in --output"}),
              _RUNTIME],
}  # fmt: skip


def run_mode(args: argparse.Namespace, config=None) -> None:
    """Run export (with the loaded `config`), serve or score."""
    from tml.ml_logging.log import setup_logging

    setup_logging(0)
    if args.mode == "export":
        from tml.projects.home.recap.serving.export import export_checkpoint

        groups = None if args.part is None else [g.strip() for g in args.part.split(",")]
        export_checkpoint(config, args.checkpoint, args.output, groups, args.compile, args.overwrite)
    elif args.mode == "serve":
        from tml.projects.home.recap.serving.service import ServeOptions, serve

        serve(ServeOptions(args.artifact, args.host, args.port, args.max_batch_records, args.max_wait_ms,
                           args.max_request_records, args.max_request_bytes, args.drain_seconds, args.runtime,
                           args.threads))  # fmt: skip
    elif args.mode == "score":
        from tml.projects.home.recap.serving.score import score_files

        score_files(args.artifact, args.input, args.output, args.overwrite, args.batch_size, args.runtime)
