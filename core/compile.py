"""`training.compile`: torch.compile of a model's dense parts, in place, for any project's model.

The dense parts are the largest submodules that hold no embedding table (torchrec collections and their
sharded forms stay eager: their kernels are FBGEMM's, and the sparse-dist pipeline rewrites their forwards).
A model without tables is compiled whole. Each part is compiled with `nn.Module.compile()`, which keeps the
module object, its parameters and its `state_dict` names (no `_orig_mod.` prefix), so checkpoints, optimizers,
DDP and the pipelines see the same model compiled or not. Containers that are never called (`ModuleDict`,
`ModuleList`) are entered rather than compiled. Where it wins is measured in benchmarks/RESULTS.md.

Example:
    names = compile_dense(sharded.module)   # ["model.featurizer", "model.backbone", ...]
"""

from __future__ import annotations

import sys

from torch import nn

from tml.core.sharding import clean_name

_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def _table_types() -> tuple[type, ...]:
    # A model can hold torchrec modules only once torchrec is imported; dense-only runs never import it.
    if "torchrec" not in sys.modules:
        return ()
    from torchrec.distributed.types import ShardedModule
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return (EmbeddingBagCollection, EmbeddingCollection, ShardedModule)


def compile_dense(module: nn.Module) -> list[str]:
    """Compile every maximal table-free submodule of `module` in place; return their names (wrapper
    prefixes removed, "" for the whole module)."""
    tables = _table_types()
    holds_table: dict[int, bool] = {}

    def has_table(m: nn.Module) -> bool:
        key = id(m)
        if key not in holds_table:
            holds_table[key] = isinstance(m, tables) or any(has_table(c) for c in m.children())
        return holds_table[key]

    compiled: list[str] = []

    def visit(m: nn.Module, name: str) -> None:
        if tables and isinstance(m, tables):
            return
        if not has_table(m) and not isinstance(m, _CONTAINERS):
            m.compile()
            compiled.append(clean_name(name))
            return
        for child_name, child in m.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(module, "")
    return compiled
