"""Shard a finished model: torchrec DistributedModelParallel for embedding tables, DDP otherwise.

Tables named in `table_optimizers` get their optimizer fused into the backward pass
(`apply_optimizer_in_backward`) when the device's FBGEMM kernels implement it (CPU: exact SGD, Adagrad,
row-wise Adagrad; CUDA: also Adam). Otherwise, or with `compute_kernel: dense`, the table is replicated
(data_parallel, dense kernel) and updated by an ordinary torch optimizer returned in
`ShardedModel.table_optimizers`. Weights are [num_embeddings, D] per table.

Example:
    sharded = shard_model(model, env, {"user": ("row_wise", "fused")}, {"user": emb_opt_config})
    optimizer, scheduler = build_optimizer(sharded.dense_named_parameters(), config.optimizer)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from tml.core.distributed import DistEnv
from tml.ml_logging.log import get_logger, warn_once
from tml.optimizers.build import embedding_optimizer, fused_supported, is_in_backward
from tml.optimizers.config import EmbeddingOptimizerConfig

logger = get_logger(__name__)

MODEL_PARALLEL = ("table_wise", "row_wise", "table_row_wise", "column_wise")
_WRAPPERS = ("_dmp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    """A parameter name without DMP/DDP wrapper prefixes, the same at every world size."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


@dataclasses.dataclass
class ShardedModel:
    """A model ready to train, plus the ordinary optimizers of tables that cannot run fused.

    Args:
        module: the DistributedModelParallel, DDP or untouched model; call it like the model.
        table_optimizers: table name -> torch optimizer (dense-kernel tables only).
        table_parameters: table name -> parameter name in `module` of those tables.
    """

    module: nn.Module
    table_optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    table_parameters: dict[str, str] = dataclasses.field(default_factory=dict)

    def dense_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters for the dense optimizer: not fused in backward, not owned by a table optimizer.

        Names are the model's own (`clean_name`), the same at every world size and wrapper.
        """
        skip = set(self.table_parameters.values())
        for name, param in self.module.named_parameters():
            if name not in skip and not is_in_backward(param):
                yield clean_name(name), param

    @property
    def fused_optimizer(self):
        """torchrec's KeyedOptimizer of the fused tables, or None without DistributedModelParallel."""
        return getattr(self.module, "fused_optimizer", None)


def find_tables(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Table name -> (path of its EmbeddingBagCollection, the collection); names are unique."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                if table.name in tables:
                    raise ValueError(f"embedding table name '{table.name}' is used twice ({path})")
                tables[table.name] = (path, module)
    return tables


def _sharder_class():
    from torchrec.distributed.embedding_types import ShardingType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class RowWiseOnCpuSharder(EmbeddingBagCollectionSharder):
        """torchrec offers row-wise layouts only for cuda; the CPU kernels and gloo collectives work."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = super().sharding_types(compute_device_type)
            extra = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
            return types + [t for t in extra if t not in types]

    return RowWiseOnCpuSharder


def shard_model(
    model: nn.Module,
    env: DistEnv,
    table_shardings: dict[str, tuple[str | None, str | None]] | None,
    table_optimizers: dict[str, EmbeddingOptimizerConfig],
) -> ShardedModel:
    """Wrap `model` for training on `env` (see module docstring).

    Args:
        model: the finished train module, weights on CPU or `env.device`.
        env: from `init_distributed`.
        table_shardings: table name -> (sharding_type, compute_kernel), None entries left to the planner.
        table_optimizers: table name -> its optimizer config; every table needs one.
    """
    tables = find_tables(model) if _has_torchrec_tables(model) else {}
    if not tables:
        if table_optimizers or table_shardings:
            names = sorted({*(table_optimizers or {}), *(table_shardings or {})})
            raise ValueError(f"optimizer/sharding given for tables {names}, but the model has no tables")
        model = model.to(env.device)
        if env.world_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return ShardedModel(model)
    table_shardings = table_shardings or {}
    _check_names(tables, table_shardings, table_optimizers)
    constraints, fallback = _apply_table_optimizers(tables, table_shardings, table_optimizers, env)
    module, plan = _wrap_dmp(model, env, constraints)
    _log_plan(plan, table_optimizers, fallback, env)
    params = dict(module.named_parameters())
    table_parameters, optimizers = {}, {}
    for name in fallback:
        path = tables[name][0]
        fqn = next(n for n in params if n.endswith(f"{path}.embedding_bags.{name}.weight"))
        cls, kwargs = embedding_optimizer(table_optimizers[name])
        table_parameters[name] = fqn
        optimizers[name] = cls([params[fqn]], **kwargs)
    return ShardedModel(module, optimizers, table_parameters)


def _has_torchrec_tables(model: nn.Module) -> bool:
    # Checked by class name first so that dense-only models never import torchrec.
    return any(type(m).__name__ == "EmbeddingBagCollection" for m in model.modules())


def _check_names(tables, table_shardings, table_optimizers) -> None:
    for what, given in (("sharding", table_shardings), ("optimizer", table_optimizers)):
        unknown = sorted(set(given) - set(tables))
        if unknown:
            raise ValueError(f"{what} config for unknown tables {unknown}; model tables: {sorted(tables)}")
    missing = sorted(set(tables) - set(table_optimizers))
    if missing:
        raise ValueError(f"embedding tables {missing} have no optimizer config")


def _apply_table_optimizers(tables, table_shardings, table_optimizers, env):
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.planner import ParameterConstraints

    constraints, fallback = {}, []
    for name, (_, ebc) in tables.items():
        sharding, kernel = table_shardings.get(name, (None, None))
        config = table_optimizers[name]
        if kernel == "dense" or sharding == "data_parallel":
            fallback.append(name)
        elif not fused_supported(config, env.device.type):
            warn_once(
                logger,
                f"table '{name}': this optimizer has no fused {env.device.type} kernel; the table is "
                f"replicated (data_parallel, dense kernel, sharding '{sharding or 'planner'}' not used) "
                "and updated by an ordinary torch optimizer",
            )
            fallback.append(name)
        else:
            cls, kwargs = embedding_optimizer(config)
            _apply_optimizer_in_backward(cls, ebc.embedding_bags[name].parameters(), kwargs)
            types = [sharding] if sharding else list(MODEL_PARALLEL)
            constraints[name] = ParameterConstraints(sharding_types=types, compute_kernels=["fused"])
            continue
        constraints[name] = ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
    return constraints, fallback


def _wrap_dmp(model, env, constraints):
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    sharders = [_sharder_class()()]
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    module = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=env.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=_data_parallel_wrapper(),
    )
    return module, plan


def _data_parallel_wrapper():
    """torchrec's DDP wrapper of the dense part, skipped on one rank, where DDP's gradient hooks and
    all_reduce of every bucket only cost time (~10% of a small model's step on CPU)."""
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

    class SkipOnOneRank(DefaultDataParallelWrapper):
        def wrap(self, dmp, env, device) -> None:
            if env.world_size > 1:
                super().wrap(dmp, env, device)

    return SkipOnOneRank()


def _log_plan(plan, table_optimizers, fallback, env) -> None:
    if not env.is_main:
        return
    rows = [("table", "sharding", "kernel", "ranks", "optimizer")]
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            kind = type(table_optimizers[table]).model_fields
            algo = next(k for k in kind if getattr(table_optimizers[table], k) is not None)
            mode = "ordinary" if table in fallback else "fused"
            ranks = ",".join(str(r) for r in ps.ranks) if ps.ranks else "all"
            rows.append((table, ps.sharding_type, ps.compute_kernel, ranks, f"{algo} ({mode})"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    logger.info("sharding plan (%d ranks):\n%s", env.world_size, "\n".join(lines))


def _table_state_key(module: nn.Module, table: str) -> str:
    keys = [k for k in module.state_dict() if k.endswith(f"embedding_bags.{table}.weight")]
    if len(keys) != 1:
        raise ValueError(f"model has no (or several) embedding table '{table}': {keys}")
    return keys[0]


@torch.no_grad()
def load_full_table(module: nn.Module, table: str, weight: torch.Tensor) -> None:
    """Copy a full [num_embeddings, D] tensor into table `table`, sharded or not (this rank's part)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    target = module.state_dict()[_table_state_key(module, table)]
    if tuple(target.shape) != tuple(weight.shape):
        raise ValueError(f"table '{table}' has shape {tuple(target.shape)}, got {tuple(weight.shape)}")
    if not isinstance(target, ShardedTensor):
        target.copy_(weight)
        return
    for shard in target.local_shards():
        (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shard.tensor.copy_(weight[row : row + rows, col : col + cols])


@torch.no_grad()
def gather_full_table(module: nn.Module, table: str) -> torch.Tensor:
    """The full [num_embeddings, D] weight of `table` on every rank (a collective when sharded)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    source = module.state_dict()[_table_state_key(module, table)]
    if not isinstance(source, ShardedTensor):
        return source.detach().clone().cpu()
    # NCCL reduces only CUDA tensors.
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    full = torch.zeros(tuple(source.shape), dtype=source.dtype, device=device)
    for shard in source.local_shards():
        (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        full[row : row + rows, col : col + cols] = shard.tensor.to(device)
    # Shards do not overlap, so a sum assembles the whole table on every rank.
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)
    return full.cpu()
