"""tml-twhin: TwHIN graph embeddings. So far: `generate-data`, synthetic edges with learnable structure.

    tml-twhin generate-data --tables user=424241,tweet=72543 \
        --relations fav:user:tweet,reply:user:tweet,retweet:user:tweet,magic_recs:user:tweet \
        --num-edges 1000000 --output data/twhin

Training TwHIN embeddings is not built yet; it comes with its own issue on the same core.
"""

from __future__ import annotations

import argparse

from tml.core.cli import add_debug_flag, user_errors_as_one_line
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml-twhin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("generate-data", help="write synthetic edges (lhs, rel, rhs) as Parquet")
    p.add_argument("--tables", type=_tables, required=True, help="entity tables: NAME=ROWS,...")
    p.add_argument("--relations", type=_relations, required=True, help="relations: NAME:LHS:RHS,...")
    p.add_argument("--num-edges", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-files", type=int, default=2)
    add_debug_flag(p)
    return parser


def cli(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors_as_one_line("tml-twhin", args.debug):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    from tml.projects.twhin.data.synthetic import generate_edges

    unknown = sorted({t for _, lhs, rhs in args.relations for t in (lhs, rhs)} - set(args.tables))
    if unknown:
        raise UserError(
            f"--relations name tables {unknown} that --tables does not define ({sorted(args.tables)})"
        )
    generate_edges(args.tables, args.relations, args.num_edges, args.output, args.seed, args.num_files)
    print(f"wrote {args.num_edges} edges to {args.output}")


if __name__ == "__main__":
    cli()
