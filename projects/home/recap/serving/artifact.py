"""The exported artifact: a folder that scores without the training stack, and its loader (torch only).

Layout (written by `tml-recap export`, see docs/serving.md):
    artifact.json   what the program is: format version, runtime, inputs (the feature schema the reader
                    decodes), outputs, tasks, ranking weights, heads (odds ratios, affine maps,
                    calibration knots), split-tower groups, source checkpoint and step, torch version
    config.yaml     the resolved config the model was built from
    program.pt2     the `torch.export` program (dynamic batch dimension), always present (portable)
    compiled.pt2    the AOTInductor package of the same program, when it compiled on the exporting machine

This module imports torch, the standard library and `tml.core.errors` only, so an artifact loads where torchrec (and the rest
of tml's training stack) is absent.

Shapes: B = batch, N_f = ids of sparse feature f. An artifact whose model reads sparse continuous features
takes a fourth dict, their values [N_f] float32 (their ids and offsets are in the second and third).

Example:
    artifact = load_artifact("artifacts/local")
    out = artifact({"continuous": x, ...}, {"author_id": ids}, {"author_id": offsets})  # {"score": [B], ...}
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from tml.core.errors import UserError

FORMAT = "tml-recap-artifact"
VERSION = 1
META = "artifact.json"
PROGRAM = "program.pt2"
COMPILED = "compiled.pt2"
RUNTIMES = ("auto", "aoti", "exported_program")

logger = logging.getLogger(__name__)


def sample_inputs(inputs: dict, batch: int, seed: int = 0):
    """Random (dense, ids, offsets[, values]) that fit the schema `inputs`, every id inside its table."""
    g = torch.Generator().manual_seed(seed)
    dense = {}
    for d in inputs["dense"]:
        if d["dtype"] == "int64":
            dense[d["name"]] = torch.randint(0, 3, (batch, d["width"]), generator=g)
        else:
            dense[d["name"]] = torch.randn(batch, d["width"], generator=g)
    values, offsets = {}, {}
    for i, s in enumerate(inputs["sparse"]):
        lengths = torch.tensor([(row + i) % 3 for row in range(batch)])  # empty rows included
        offsets[s["name"]] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        values[s["name"]] = torch.randint(0, s["rows"], (int(lengths.sum()),), generator=g)
    continuous = inputs.get("sparse_continuous", [])
    if not continuous:
        return dense, values, offsets
    weights = {}
    for i, c in enumerate(continuous):
        lengths = torch.tensor([(row + i + 1) % 4 for row in range(batch)])
        offsets[c["name"]] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        values[c["name"]] = torch.randint(0, c["num_buckets"], (int(lengths.sum()),), generator=g)
        # Zeros, negatives and large magnitudes: the sparse linear layer's normalisation sees them all.
        weights[c["name"]] = torch.randn(int(lengths.sum()), generator=g) * 100.0
    return dense, values, offsets, weights


class ArtifactError(UserError, ValueError):
    """An artifact folder that cannot be read, or inputs that do not fit it."""


def read_meta(path: str) -> dict[str, Any]:
    """artifact.json of the artifact folder `path`, checked for format and version."""
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--artifact {path!r} does not exist (a folder written by `tml-recap export`)"
        )
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"--artifact {path!r} has no {META}: not an artifact folder written by `tml-recap export`"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ArtifactError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, this tml reads "
            f"{FORMAT!r} version {VERSION}"
        )
    return meta


class Artifact:
    """A loaded artifact: `artifact(dense, sparse_values, sparse_offsets)` -> {output name: tensor}.

    Args:
        path: the artifact folder.
        runtime: "auto" (the compiled package when there is one and it loads here, else the exported
            program), "aoti" (the compiled package or an error) or "exported_program".

    Attributes:
        meta: artifact.json. `runtime`: the runtime in use. `outputs`, `tasks`: from meta.

    Shapes: dense {name: [B, width]} (float32 or int64 as `meta["inputs"]["dense"]` says), sparse_values
    {feature: [N_f] int64}, sparse_offsets {feature: [B + 1] int64}.
    """

    def __init__(self, path: str, runtime: str = "auto") -> None:
        if runtime not in RUNTIMES:
            raise ArtifactError(f"runtime {runtime!r}: expected one of {RUNTIMES}")
        self.path = path
        self.meta = read_meta(path)
        self.outputs: list[str] = list(self.meta["outputs"])
        self.tasks: list[str] = list(self.meta["tasks"])
        self._dense = [
            (d["name"], d["width"], getattr(torch, d["dtype"])) for d in self.meta["inputs"]["dense"]
        ]
        self._sparse = [s["name"] for s in self.meta["inputs"]["sparse"]]
        self._continuous = [c["name"] for c in self.meta["inputs"].get("sparse_continuous", [])]
        self.runtime, self._call = self._load(runtime)

    def _load(self, runtime: str):
        compiled = os.path.join(self.path, COMPILED)
        if runtime != "exported_program" and os.path.exists(compiled):
            try:
                return "aoti", torch._inductor.aoti_load_package(compiled)
            except Exception as error:  # a package built for another CPU, compiler or torch
                if runtime == "aoti":
                    raise ArtifactError(
                        f"{compiled}: cannot load the AOTInductor package: {error}"
                    ) from error
                logger.warning("%s does not load here (%s); using the exported program", compiled, error)
        elif runtime == "aoti":
            raise ArtifactError(f"{self.path}: no {COMPILED} (exported with runtime {self.meta['runtime']})")
        program = torch.export.load(os.path.join(self.path, PROGRAM)).module()
        return "exported_program", program

    def check_inputs(
        self,
        dense: dict[str, torch.Tensor],
        sparse_values: dict[str, torch.Tensor],
        sparse_offsets: dict[str, torch.Tensor],
        sparse_weights: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """The batch size B, after checking names, shapes and dtypes (ArtifactError naming the input)."""
        weights = sparse_weights or {}
        missing = [name for name, _, _ in self._dense if name not in dense]
        missing += [
            f"sparse {name}"
            for name in [*self._sparse, *self._continuous]
            if name not in sparse_values or name not in sparse_offsets
        ]
        missing += [f"sparse continuous values {name}" for name in self._continuous if name not in weights]
        if missing:
            raise ArtifactError(
                f"inputs {missing} are missing; the artifact reads dense {[n for n, _, _ in self._dense]}, sparse {self._sparse}"
            )
        sizes = set()
        for name, width, dtype in self._dense:
            tensor = dense[name]
            if tensor.dim() != 2 or tensor.shape[1] != width or tensor.dtype != dtype:
                raise ArtifactError(
                    f"dense input {name!r}: got {tensor.dtype} {list(tensor.shape)}, expected {dtype} [B, {width}]"
                )
            sizes.add(tensor.shape[0])
        for name in self._continuous:
            if weights[name].dim() != 1 or weights[name].dtype != torch.float32:
                raise ArtifactError(f"sparse continuous input {name!r}: expected float32 values [N]")
            if weights[name].shape != sparse_values[name].shape:
                raise ArtifactError(
                    f"sparse continuous input {name!r}: {weights[name].shape[0]} values for "
                    f"{sparse_values[name].shape[0]} ids"
                )
        for name in [*self._sparse, *self._continuous]:
            values, offsets = sparse_values[name], sparse_offsets[name]
            if (
                values.dim() != 1
                or offsets.dim() != 1
                or values.dtype != torch.int64
                or offsets.dtype != torch.int64
            ):
                raise ArtifactError(
                    f"sparse input {name!r}: expected int64 ids [N] and int64 offsets [B + 1]"
                )
            sizes.add(offsets.shape[0] - 1)
        if len(sizes) != 1:
            raise ArtifactError(f"inputs disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def __call__(
        self,
        dense: dict[str, torch.Tensor],
        sparse_values: dict[str, torch.Tensor],
        sparse_offsets: dict[str, torch.Tensor],
        sparse_weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        self.check_inputs(dense, sparse_values, sparse_offsets, sparse_weights)
        dense = {name: dense[name] for name, _, _ in self._dense}
        values = {name: sparse_values[name] for name in [*self._sparse, *self._continuous]}
        offsets = {name: sparse_offsets[name] for name in [*self._sparse, *self._continuous]}
        inputs = (dense, values, offsets)
        if self._continuous:
            inputs += ({name: sparse_weights[name] for name in self._continuous},)
        with torch.inference_mode():
            out = self._call(*inputs)
        return {name: out[name] for name in self.outputs}


def load_artifact(path: str, runtime: str = "auto") -> Artifact:
    """Load the artifact folder `path` (see Artifact)."""
    return Artifact(path, runtime)
