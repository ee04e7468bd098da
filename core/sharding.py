"""Shard a finished model: torchrec DistributedModelParallel for embedding tables, DDP otherwise.

Tables are built on the `meta` device by the project and materialised here, one rank's pieces at a time
(see core/tables.py), then initialised from the run's seed independently of the sharding. Each table's
optimizer arrives as flat data, `TableOptimizer(cls, kwargs)` (a torch optimizer class, e.g.
`torch.optim.SGD` or torchrec's `RowWiseAdagrad`, and its keyword arguments). It is fused into the backward
pass (`apply_optimizer_in_backward`) where the device's FBGEMM kernels implement it (CPU: exact SGD,
Adagrad, row-wise Adagrad; CUDA: also Adam). Otherwise the table is replicated (data_parallel, dense kernel)
and updated by an ordinary torch optimizer returned in `ShardedModel.table_optimizers`; asking explicitly
for a placement or kernel that cannot be honoured is an error.

The planner sees the job as torchrec asks: a Topology from `TopologyFactory` with the hosts of the run
(world size / LOCAL_WORLD_SIZE), each rank's memory, and the per-rank batch size.

Example:
    sharded = shard_model(model, env, {"user": ("row_wise", "fused")},
                          {"user": TableOptimizer(torch.optim.SGD, {"lr": 0.1})}, seed=0, batch_size=512)
    optimizer, scheduler = build_optimizer(sharded.dense_named_parameters(), config.optimizer)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tml.core.config.loader import ConfigError
from tml.core.distributed import DistEnv
from tml.core.tables import default_init, init_tables
from tml.ml_logging.log import get_logger, warn_once

logger = get_logger(__name__)

MODEL_PARALLEL = ("table_wise", "row_wise", "table_row_wise", "column_wise")
_WRAPPERS = ("_dmp_wrapped_module.", "module.")
# Fused (in-backward) algorithms the FBGEMM CPU kernels implement, by optimizer class name; CUDA has all.
CPU_FUSED = frozenset({"SGD", "Adagrad", "RowWiseAdagrad"})


@dataclasses.dataclass(frozen=True)
class TableOptimizer:
    """One table's optimizer: a torch optimizer class and its keyword arguments (torchrec maps the class
    to the FBGEMM algorithm when fused)."""

    cls: type
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.cls.__name__


def fused_supported(optimizer: TableOptimizer, device_type: str) -> bool:
    """Whether the table algorithm can run fused in the backward pass on `device_type`."""
    return device_type != "cpu" or optimizer.name in CPU_FUSED


def is_in_backward(param: torch.Tensor) -> bool:
    """True for parameters updated by a fused optimizer in the backward pass (torch / torchrec marker)."""
    return hasattr(param, "_in_backward_optimizers")


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
        plan: torchrec's ShardingPlan (None without tables).
        num_hosts: machines the planner saw (world size / ranks per machine).
    """

    module: nn.Module
    table_optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    table_parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    plan: Any = None
    num_hosts: int = 1

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

    @property
    def state_module(self) -> nn.Module:
        """The module whose parameter names are stable across world sizes (inside DMP; DDP's `module.`
        prefix is skipped by torch.distributed.checkpoint.state_dict)."""
        return getattr(self.module, "_dmp_wrapped_module", self.module)


def find_tables(model: nn.Module) -> dict[str, tuple[str, nn.Module, Any]]:
    """Table name -> (path of its EmbeddingBagCollection, the collection, its EmbeddingBagConfig)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables: dict[str, tuple[str, nn.Module, Any]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for table in module.embedding_bag_configs():
                if table.name in tables:
                    raise ValueError(f"embedding table name '{table.name}' is used twice ({path})")
                tables[table.name] = (path, module, table)
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
    table_optimizers: dict[str, TableOptimizer],
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | None = None,
    memory_bytes: int | None = None,
    gradient_accumulation: int = 1,
) -> ShardedModel:
    """Wrap `model` for training on `env` (see module docstring).

    Args:
        model: the finished train module; dense weights on CPU or `env.device`, tables on any device
            (`meta` avoids allocating them before sharding).
        env: from `init_distributed`.
        table_shardings: table name -> (sharding_type, compute_kernel), None entries left to the planner.
        table_optimizers: table name -> its optimizer; every table needs one.
        seed: tables start from values that depend only on (seed, table, row).
        batch_size: examples per rank and batch (the planner's cost model); None: torchrec's default.
        device: where shards live (default `env.device`; `meta` plans and shards without allocating).
        memory_bytes: memory per rank the planner may fill (default: the device's, see `_memory`).
        gradient_accumulation: batches per optimizer step; above 1 the dense part's DDP skips gradient
            all-reduces on all but the last batch, which DDP's static-graph mode does not allow.
    """
    tables = find_tables(model) if _has_torchrec_tables(model) else {}
    device = device or env.device
    if not tables:
        if table_optimizers or table_shardings:
            names = sorted({*(table_optimizers or {}), *(table_shardings or {})})
            raise ValueError(f"optimizer/sharding given for tables {names}, but the model has no tables")
        model = model.to(device)
        if env.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return ShardedModel(model)
    table_shardings = table_shardings or {}
    _check_names(tables, table_shardings, table_optimizers)
    constraints, fallback = _apply_table_optimizers(tables, table_shardings, table_optimizers, env)
    module, plan, topology = _wrap_dmp(
        model, env, constraints, device, batch_size, memory_bytes, gradient_accumulation == 1
    )
    _log_plan(plan, table_optimizers, fallback, env)
    inits = {
        name: config.init_fn or default_init(config.num_embeddings) for name, (_, _, config) in tables.items()
    }
    init_tables(module, inits, seed)
    params = dict(module.named_parameters())
    table_parameters, optimizers = {}, {}
    for name in fallback:
        path = tables[name][0]
        fqn = next(n for n in params if n.endswith(f"{path}.embedding_bags.{name}.weight"))
        table_parameters[name] = fqn
        spec = table_optimizers[name]
        optimizers[name] = spec.cls([params[fqn]], **spec.kwargs)
    hosts = env.world_size // topology.local_world_size
    return ShardedModel(module, optimizers, table_parameters, plan, hosts)


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
    for name, (_, ebc, _) in tables.items():
        sharding, kernel = table_shardings.get(name, (None, None))
        spec = table_optimizers[name]
        if kernel == "dense" or sharding == "data_parallel":
            fallback.append(name)
        elif not fused_supported(spec, env.device.type):
            if sharding is not None or kernel is not None:
                asked = ", ".join(
                    f"{key} '{value}'"
                    for key, value in (("sharding_type", sharding), ("compute_kernel", kernel))
                    if value
                )
                raise ConfigError(
                    f"table '{name}': {asked} needs the optimizer fused into the backward pass, and "
                    f"{spec.name} has no fused {env.device.type} kernel (CPU has {sorted(CPU_FUSED)}); "
                    "choose one of those, or sharding_type 'data_parallel' with compute_kernel 'dense'"
                )
            warn_once(
                logger,
                f"table '{name}': {spec.name} has no fused {env.device.type} kernel; the table is "
                "replicated (data_parallel, dense kernel) and updated by an ordinary torch optimizer",
            )
            fallback.append(name)
        else:
            _apply_optimizer_in_backward(spec.cls, ebc.embedding_bags[name].parameters(), spec.kwargs)
            types = [sharding] if sharding else list(MODEL_PARALLEL)
            constraints[name] = ParameterConstraints(sharding_types=types, compute_kernels=["fused"])
            continue
        constraints[name] = ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
    return constraints, fallback


def _memory(device: torch.device, env: DistEnv) -> tuple[int, int]:
    """(HBM, DDR) bytes per rank: the GPU's memory, and this machine's memory shared by its ranks."""
    ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(env.local_world_size, 1)
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return hbm, ddr


def _topology(env: DistEnv, device: torch.device, memory_bytes: int | None):
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    hbm, ddr = _memory(device, env)
    if memory_bytes is not None:
        hbm, ddr = (memory_bytes, ddr) if env.device.type == "cuda" else (hbm, memory_bytes)
    trainer = TrainerConfig(
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        hbm_cap_bytes=hbm,
        ddr_cap_bytes=ddr,
    )
    kernel = KernelConfig(compute_device=env.device.type)
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=kernel)


def _dense_bytes(model: nn.Module, tables) -> int:
    table_weights = {id(ebc.embedding_bags[name].weight) for name, (_, ebc, _) in tables.items()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in table_weights)


def _wrap_dmp(model, env, constraints, device, batch_size, memory_bytes, static_graph):
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.types import ShardingEnv

    sharders = [_sharder_class()()]
    topology = _topology(env, device, memory_bytes)
    capacity = (
        topology.devices[0].storage.hbm if env.device.type == "cuda" else topology.devices[0].storage.ddr
    )
    # Reserve the dense part (weights, gradients, optimizer moments, DDP buckets: ~6x its size) plus a
    # margin, from the model itself rather than torchrec's heuristic, which warns and misestimates it.
    dense = 6 * _dense_bytes(model, find_tables(model))
    reservation = FixedPercentageStorageReservation(min(0.9, 0.15 + dense / max(capacity, 1)))
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, storage_reservation=reservation
    )
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    module = DistributedModelParallel(
        model,
        env=ShardingEnv(env.world_size, env.rank, pg, output_dtensor=True),
        device=device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=_data_parallel_wrapper(static_graph),
    )
    return module, plan, topology


def _data_parallel_wrapper(static_graph: bool):
    """The dense part of a sharded model in DDP: every parameter but the sharded tables'.

    Skipped on one rank, where DDP's gradient hooks and all_reduce of every bucket only cost time (~10% of a
    small model's step on CPU). Buffers (batch-norm statistics) are not synchronised in the forward, as in
    torchrec's own wrapper; they start equal on every rank from the shared seed.
    """
    from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel

    class DenseDataParallel(DataParallelWrapper):
        def wrap(self, dmp, env, device) -> None:
            module = dmp._dmp_wrapped_module
            if env.world_size == 1 or isinstance(module, nn.parallel.DistributedDataParallel):
                return
            sharded = set(DistributedModelParallel._sharded_parameter_names(module))
            if not set(dict(module.named_parameters())) - sharded:
                return
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded)
            dmp._dmp_wrapped_module = nn.parallel.DistributedDataParallel(
                module.to(device),
                device_ids=None if device.type == "cpu" else [device],
                process_group=env.process_group,
                gradient_as_bucket_view=True,
                forward_sync_buffers=False,
                static_graph=static_graph,
            )

    return DenseDataParallel()


def _log_plan(plan, table_optimizers, fallback, env) -> None:
    if not env.is_main:
        return
    rows = [("table", "sharding", "kernel", "ranks", "optimizer")]
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            mode = "ordinary" if table in fallback else "fused"
            ranks = ",".join(str(r) for r in ps.ranks) if ps.ranks else "all"
            rows.append(
                (
                    table,
                    ps.sharding_type,
                    ps.compute_kernel,
                    ranks,
                    f"{table_optimizers[table].name} ({mode})",
                )
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    logger.info(
        "sharding plan (%d ranks on %d host(s)):\n%s", env.world_size, env.num_hosts, "\n".join(lines)
    )
