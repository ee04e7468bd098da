"""Third-party warnings a normal run would print and tml cannot fix, silenced one by one, each with why.

What tml could fix it fixed at the cause: the planner's Topology comes from torchrec's TopologyFactory,
storage is reserved from a dense-tensor estimate (no HeuristicalStorageReservation), table state dicts are
DTensors (no ShardedTensor deprecation), the dense part's DDP takes current arguments, and LOCAL_WORLD_SIZE
is exported for torchrec (core/distributed.py). What is left is raised inside torch / torchrec / FBGEMM code
that tml calls as it is meant to be called. Each filter matches only its own message, so anything new still
shows.

Example:
    quiet_known_warnings()   # once per process, before building the model (core.run.start does it)
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex, why it cannot be fixed here)
_WARNINGS = (
    (
        FutureWarning,
        r"`broadcast_buffers` is deprecated",
        "torchrec wraps the lookups of replicated (data_parallel) tables in DDP with this argument itself",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        "torchrec's row-wise and table-row-wise sharding calls these collectives",
    ),
    (
        Warning,  # sqlalchemy's SADeprecationWarning, not importable without sqlalchemy
        r"The ``noload`` loader strategy is deprecated",
        "MLflow's SQL tracking store (training.mlflow with a sqlite:/// URI) uses it",
    ),
    (
        UserWarning,
        r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
        "FBGEMM registers the CPU dense-kernel lookup (replicated tables) without an autograd key",
    ),
)

# logger name -> why its warning-level records are informational here
_LOGGERS = {
    "torch.fx._symbolic_trace": "torchrec calls torch.fx's is_fx_tracing(), which logs a deprecation once",
    "torchrec.distributed.comm": "torchrec logs every process group it builds and the pod size it assumes",
}


def quiet_known_warnings() -> None:
    """Install the filters above (idempotent)."""
    for category, message, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
