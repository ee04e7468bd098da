"""A text summary of any nn.Module: one row per sub-module down to `max_depth`, and the total.

Counts each parameter once (shared parameters are not double counted), works on "meta" tensors and on
TorchRec EmbeddingBagCollections (their tables are ordinary parameters until sharded; sharded / DTensor
parameters report their global size through `numel()`).

Example:
    print(summarize(model, max_depth=2))
    # module              type        parameters   trainable
    # featurizer          DenseFeaturizer     4352        4352
    # ...
    # total parameters: 48213001
"""

from __future__ import annotations

from torch import nn


def _count(module: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def summarize(model: nn.Module, max_depth: int = 2) -> str:
    """Table of (module path, type, parameter count, trainable count), indented by depth, then the total.

    Args:
        model: any module.
        max_depth: deepest module path shown (1 = direct children).
    """
    rows = []
    for path, module in model.named_modules():
        if not path:
            continue
        depth = path.count(".") + 1
        if depth > max_depth:
            continue
        total, trainable = _count(module)
        rows.append(("  " * (depth - 1) + path, type(module).__name__, total, trainable))
    header = ("module", "type", "parameters", "trainable")
    name_w = max([len(header[0])] + [len(r[0]) for r in rows])
    type_w = max([len(header[1])] + [len(r[1]) for r in rows])
    lines = [f"{header[0]:<{name_w}}  {header[1]:<{type_w}}  {header[2]:>14}  {header[3]:>14}"]
    for name, kind, total, trainable in rows:
        lines.append(f"{name:<{name_w}}  {kind:<{type_w}}  {total:>14,}  {trainable:>14,}")
    total, trainable = _count(model)
    if trainable != total:
        lines.append(f"trainable parameters: {trainable}")
    lines.append(f"total parameters: {total}")
    return "\n".join(lines)
