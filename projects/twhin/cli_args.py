"""The command-line arguments of every `tml-twhin` mode (the modes themselves are in main.py)."""

from __future__ import annotations

import argparse

from tml.core.errors import UserError


def _tables(text: str) -> dict[str, int]:
    tables = {}
    for item in text.split(","):
        name, sep, rows = item.partition("=")
        if not sep or not rows.strip().isdigit() or int(rows) < 1:
            raise argparse.ArgumentTypeError(f"--tables: expected NAME=ROWS[,NAME=ROWS...], got '{item}'")
        tables[name.strip()] = int(rows)
    return tables


def _relations(text: str) -> list[tuple[str, str, str]]:
    relations = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"--relations: expected NAME:LHS_TABLE:RHS_TABLE, got '{item}'")
        relations.append(tuple(p.strip() for p in parts))
    return relations


MODES = {
    "train": "train (resumes from save_dir's latest checkpoint); prints edges/s as train/examples_per_s",
    "evaluate": "filtered ranking (MRR, Hits@1/3/10, random baseline) of every validation_data partition",
    "export": "write every table's vectors to Parquet (manifest.json + <table>/part-*.parquet)",
    "neighbors": "the k nearest rows of an exported vector (dot or cosine)",
    "attach": "add an export's vectors to Parquet files as a fixed-size list column, by an id column",
    "build-vocab": "number the string keys of the edges, one <table>.parquet per table",
    "generate-data": "write synthetic edges: train/ and a folder per held-out partition of --config",
}


def add_arguments(sub, add_debug_flag) -> None:
    """One subparser per mode on `sub` (argparse subparsers)."""
    for mode, help_text in MODES.items():
        p = sub.add_parser(mode, help=help_text)
        if mode in ("train", "evaluate", "export", "build-vocab"):
            p.add_argument("--config", required=True, help="YAML config (local path or fsspec URL)")
            p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
        if mode in ("evaluate", "export"):
            p.add_argument(
                "--checkpoint", help="a step-N folder or a run folder (default: save_dir's latest)"
            )
        if mode == "evaluate":
            p.add_argument("--output", help="metrics JSON file (default: <save_dir>/evaluate/step-N.json)")
        if mode == "export":
            p.add_argument("--output", required=True, help="export folder")
            p.add_argument("--overwrite", action="store_true", help="replace an export already in --output")
        if mode == "build-vocab":
            p.add_argument("--output", help="vocabulary folder (default: train_data.vocabulary)")
        if mode in ("neighbors", "attach"):
            p.add_argument("--export", required=True, help="a `tml-twhin export` folder")
            p.add_argument("--type", required=True, help="the entity table, e.g. user")
        if mode == "neighbors":
            query = p.add_mutually_exclusive_group(required=True)
            query.add_argument("--id", type=int, help="the query's row id")
            query.add_argument("--key", help="the query's key (exports with a vocabulary)")
            p.add_argument("-k", type=int, default=10, help="neighbours to print")
            p.add_argument("--among", help="the table searched (default: --type)")
            p.add_argument("--metric", choices=["dot", "cos"], default="dot")
            p.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto")
        if mode == "attach":
            p.add_argument("--input", required=True, help="Parquet glob, folder or file to extend")
            p.add_argument(
                "--id-column", required=True, help="integer id (or string key) column, e.g. meta.user_id"
            )
            p.add_argument("--name", required=True, help="the new vector column, e.g. user_twhin")
            p.add_argument("--output", required=True, help="output folder (same file names)")
            p.add_argument("--overwrite", action="store_true", help="replace files already in --output")
        if mode == "generate-data":
            p.add_argument("--config", help="write the tables, relations and splits this config reads")
            p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
            p.add_argument("--tables", type=_tables, help="without --config: entity tables NAME=ROWS,...")
            p.add_argument("--relations", type=_relations, help="without --config: NAME:LHS:RHS,...")
            p.add_argument("--num-edges", type=int, required=True, help="edges (of train_data with --config)")
            p.add_argument(
                "--output", required=True, help="folder; with --config it gets train/, valid/, ..."
            )
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--num-files", type=int, default=2, help="files per split")
            p.add_argument(
                "--validation-fraction",
                type=float,
                default=0.05,
                help="edges per held-out partition, as a fraction of --num-edges",
            )
        add_debug_flag(p)


def check_generate_args(args: argparse.Namespace) -> None:
    """generate-data takes --config or --tables + --relations."""
    if args.config is not None:
        if args.tables is not None or args.relations is not None:
            raise UserError("generate-data: give --config or --tables/--relations, not both")
        return
    if args.overrides:
        raise UserError(f"generate-data: overrides {args.overrides} need --config")
    if args.tables is None or args.relations is None:
        raise UserError("generate-data: give --config, or both --tables and --relations")
    unknown = sorted({t for _, lhs, rhs in args.relations for t in (lhs, rhs)} - set(args.tables))
    if unknown:
        raise UserError(
            f"--relations name tables {unknown} that --tables does not define ({sorted(args.tables)})"
        )
