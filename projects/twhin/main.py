"""tml-twhin: train | evaluate | export | neighbors | attach | build-vocab | generate-data.

tml-twhin generate-data --config projects/twhin/config/local.yaml --num-edges 400000 --output data/twhin_local
tml-twhin train --config projects/twhin/config/local.yaml
torchrun --nproc_per_node=2 -m tml.projects.twhin.main train --config projects/twhin/config/local.yaml
"""

from __future__ import annotations

import argparse
import json
import os

from tml.core.cli import add_debug_flag, user_errors_as_one_line
from tml.core.config.loader import ConfigError, load_config
from tml.core.distributed import run_distributed
from tml.ml_logging.log import get_logger, setup_logging
from tml.projects.twhin.cli_args import add_arguments, check_generate_args
from tml.projects.twhin.config import TwhinConfig

logger = get_logger(__name__)


def train(config: TwhinConfig) -> None:
    from tml.core import run
    from tml.projects.twhin import build
    from tml.projects.twhin.data.batch import TwhinBatch
    from tml.projects.twhin.evaluate import LinkEvaluator

    env = run.start(config.training)
    vocabularies = build.build_vocabularies(config)  # a missing vocabulary fails before any sharding
    train_data = build.build_train_data(config, env, vocabularies)
    sharded = build.build_sharded(config, env)
    optimizer, scheduler = build.build_twhin_optimizer(config, sharded)
    evaluate = LinkEvaluator(config, env, vocabularies) if config.validation_data else None
    # translation_optimizer.clip_grad_norm is applied by the optimizer itself (optimizers/build.py).
    job = run.TrainJob(
        config, config.training, sharded, optimizer, scheduler, train_data, TwhinBatch, evaluate
    )
    run.fit(job, env)


def _load(config: TwhinConfig, checkpoint: str | None):
    from tml.core import run
    from tml.projects.twhin import build

    env = run.start(config.training)
    vocabularies = build.build_vocabularies(config)
    sharded = build.build_sharded(config, env)
    step = run.load_trained(sharded.module, checkpoint or config.training.save_dir, config)
    return env, sharded, step, vocabularies


def evaluate(config: TwhinConfig, checkpoint: str | None, output: str | None) -> None:
    from tml.projects.twhin.evaluate import LinkEvaluator, print_table

    if not config.validation_data:
        raise ConfigError("evaluate: the config has no validation_data partitions to rank")
    env, sharded, step, vocabularies = _load(config, checkpoint)
    results = LinkEvaluator(config, env, vocabularies)(sharded.module, step)
    if env.is_main:
        path = output or os.path.join(config.training.save_dir, "evaluate", f"step-{step}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"step": step, **results}, f, indent=1)
        print(print_table(results))
        logger.info("evaluation of step %d written to %s", step, path)


def export(config: TwhinConfig, checkpoint: str | None, output: str, overwrite: bool) -> None:
    from tml.projects.twhin.export import write_export

    env, sharded, step, _ = _load(config, checkpoint)
    write_export(config, sharded.module, env, step, output, overwrite)
    if env.is_main:
        print(f"exported step {step}: {', '.join(config.table_names())} -> {output}")


def neighbors(args: argparse.Namespace) -> None:
    from tml.projects.twhin.embeddings import load

    emb = load(args.export)
    query = {"ids": [args.id]} if args.id is not None else {"keys": [args.key]}
    found = emb.neighbors(
        args.type, **query, k=args.k, among=args.among, metric=args.metric, backend=args.backend
    )
    print(
        f"{args.metric} neighbours of {args.type} {args.id if args.id is not None else args.key!r} in {found.table}:"
    )
    for rank, (row, score) in enumerate(zip(found.ids[0].tolist(), found.scores[0].tolist(), strict=True), 1):
        key = (
            f"  {found.keys[0][rank - 1] or '-'}" if found.keys is not None else ""
        )  # '-': a row without key
        print(f"{rank:4d}  {row:10d}{key}  {score:.6g}")


def attach(args: argparse.Namespace) -> None:
    from tml.projects.twhin.attach import attach as attach_vectors

    setup_logging(0)
    stats = attach_vectors(
        args.export, args.type, args.input, args.id_column, args.name, args.output, args.overwrite
    )
    share = 100.0 * stats["unknown"] / max(stats["rows"], 1)
    print(
        f"attach: {stats['rows']} rows in {stats['files']} files -> {args.output}; column {args.name!r}; "
        f"{stats['unknown']} rows ({share:.2f}%) had {args.type} ids the export does not know: zero vectors"
    )


def build_vocab(config: TwhinConfig, output: str | None) -> None:
    from tml.projects.twhin.data.vocab import build_vocabularies

    setup_logging(0)
    folder = output or config.train_data.vocabulary
    if folder is None:
        raise ConfigError("build-vocab: give --output or set train_data.vocabulary (the folder to write)")
    inputs = dict.fromkeys([config.train_data.inputs, *(p.inputs for p in config.validation_data.values())])
    relations = [(r.name, r.lhs, r.rhs) for r in config.model.relations]
    rows = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    sizes = build_vocabularies(list(inputs), relations, rows, folder)
    print(f"vocabulary -> {folder}: " + ", ".join(f"{table} {n} keys" for table, n in sizes.items()))


def generate_data(args: argparse.Namespace) -> None:
    from tml.projects.twhin.data.synthetic import generate_edges, generate_splits

    setup_logging(0)
    if args.config is None:
        generate_edges(args.tables, args.relations, args.num_edges, args.output, args.seed, args.num_files)
        print(f"wrote {args.num_edges} edges to {args.output}")
        return
    config = load_config(TwhinConfig, args.config, args.overrides)
    # Partitions reading train_data's own files take their edges from it with offset/limit.
    held_out = [n for n, p in config.validation_data.items() if p.inputs != config.train_data.inputs]
    splits = {
        "train": args.num_edges,
        **{n: int(args.num_edges * args.validation_fraction) for n in held_out},
    }
    tables = {t.name: t.num_embeddings for t in config.model.embeddings.tables}
    relations = [(r.name, r.lhs, r.rhs) for r in config.model.relations]
    keys = config.train_data.vocabulary is not None
    written = generate_splits(tables, relations, splits, args.output, args.seed, args.num_files, keys)
    for split, count in written.items():
        print(
            f"{split}: {count} edges{' (string keys)' if keys else ''} -> {os.path.join(args.output, split)}"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml-twhin", description=__doc__.splitlines()[0])
    add_arguments(parser.add_subparsers(dest="mode", required=True), add_debug_flag)
    return parser


def cli(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors_as_one_line("tml-twhin", args.debug):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    if args.mode == "generate-data":
        check_generate_args(args)
        return generate_data(args)
    if args.mode == "neighbors":
        return neighbors(args)
    if args.mode == "attach":
        return attach(args)
    config = load_config(TwhinConfig, args.config, args.overrides)
    if args.mode == "train":
        run_distributed(lambda: train(config))
    elif args.mode == "evaluate":
        run_distributed(lambda: evaluate(config, args.checkpoint, args.output))
    elif args.mode == "export":
        run_distributed(lambda: export(config, args.checkpoint, args.output, args.overwrite))
    elif args.mode == "build-vocab":
        build_vocab(config, args.output)


if __name__ == "__main__":
    cli()
