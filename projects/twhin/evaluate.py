"""Filtered link-prediction ranking of held-out edges, on any number of ranks with sharded tables.

Every held-out edge (lhs, r, rhs) is two queries: predict rhs given (lhs, r), ranked against every row of
r's rhs table, and predict lhs given (r, rhs), against every row of r's lhs table. Candidates that are
known true edges other than the one being ranked (any edge of `evaluation.filter_inputs`: by default the
training edges and every validation partition) are removed first, the standard "filtered" setting. The
rank of the true row is `1 + #{candidates scoring higher} + 0.5 * #{candidates scoring the same}`, the
same tie rule as tml.core.metrics_rank; MRR = mean(1 / rank), Hits@k = mean(rank <= k), per relation and
side, per relation, and over everything (`all`), beside the expectation of a uniformly random ranker
over the same filtered candidate counts n: MRR H(n) / n, Hits@k min(k, n) / n.

How it runs on N ranks without ever holding a table or a [queries x rows] matrix:
1. each rank reads its share of the partition (`lockstep`, so uneven shares never hang the sharded
   lookups) and looks up its edges' vectors; the queries are then gathered on every rank (small: 2 D
   floats per edge);
2. each rank reads its slice of every target table in chunks of `candidate_chunk_size` rows
   (tml.projects.twhin.tables) and scores all queries against it, `validation batch / ranks` queries at
   a time; the known edges are read by every rank, keeping only those whose candidate lies in its slice;
3. the per-query counts (higher, tied, filtered) are summed over ranks with one all_reduce.
Scores come from the model's own operator and comparator; the true edge's score is computed edge-wise,
the candidates' by matrix products, so ties within float rounding may count either way.

Example:
    evaluator = LinkEvaluator(config, env)
    results = evaluator(sharded.module, step)   # {"eval/valid/fav/mrr": 0.31, ...}
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from tml.core.distributed import DistEnv
from tml.core.eval_loop import lockstep
from tml.core.metrics_rank import RankMetrics
from tml.ml_logging.console import eval_tables
from tml.ml_logging.log import get_logger
from tml.ml_logging.progress import progress_bar
from tml.projects.twhin import build
from tml.projects.twhin.config import ALL_RELATIONS, EdgeInputConfig, TwhinConfig
from tml.projects.twhin.data.edges import build_edge_dataset
from tml.projects.twhin.model.operators import pairwise
from tml.projects.twhin.tables import lookup, rank_slice, table_chunks

logger = get_logger(__name__)
KS = (1, 3, 10)
SIDES = ("rhs", "lhs")  # rhs: predict rhs given (lhs, r); lhs: predict lhs given (r, rhs)
_SHIFT = 31  # filter pairs are packed as a * 2^31 + b (rows and query counts stay below 2^31)
_MASK = (1 << _SHIFT) - 1
_FILTER_BATCH = 65536


@dataclasses.dataclass
class Queries:
    """Held-out edges of all ranks (Q of them): ids [Q] int64, vectors [Q, D], and this rank's own range."""

    rel: torch.Tensor
    lhs: torch.Tensor
    rhs: torch.Tensor
    lhs_vec: torch.Tensor
    rhs_vec: torch.Tensor
    own: tuple[int, int]


def _gather(tensor: torch.Tensor, env: DistEnv) -> tuple[torch.Tensor, tuple[int, int]]:
    """Rows of every rank's `tensor` in rank order, and this rank's (start, stop) among them."""
    if env.world_size == 1:
        return tensor, (0, len(tensor))
    sizes = torch.zeros(env.world_size, dtype=torch.int64, device=tensor.device)
    sizes[env.rank] = len(tensor)
    dist.all_reduce(sizes)
    biggest = int(sizes.max())
    padded = torch.zeros((biggest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    counts = sizes.tolist()
    start = sum(counts[: env.rank])
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]), (start, start + counts[env.rank])


def _read_queries(model, dataset, env: DistEnv, limit: int | None, desc: str, log_every_n: int) -> Queries:
    ids, vectors = [], []
    pairs = torch.tensor(model.relation_tables, dtype=torch.int64).reshape(-1, 2)
    stride = 2 * dataset.plan.batch_size  # the same on every rank (tables.lookup)
    bar = progress_bar(limit, desc, env.rank)
    for rounds, (edges, real) in enumerate(lockstep(dataset, env, limit), start=1):
        if rounds % log_every_n == 0:
            bar.update(log_every_n)
        rel, b = edges.rel.cpu(), edges.batch_size
        tables = torch.cat([pairs[rel, 0], pairs[rel, 1]])
        both = lookup(model, tables, torch.cat([edges.lhs, edges.rhs]), env, stride)
        if real and b:
            ids.append(torch.stack([edges.rel, edges.lhs, edges.rhs], dim=1).to(env.device))
            vectors.append(torch.cat([both[:b], both[b:]], dim=1))
    bar.close()
    dim = model.dim
    local_ids = torch.cat(ids) if ids else torch.zeros(0, 3, dtype=torch.int64, device=env.device)
    local_vec = torch.cat(vectors) if vectors else torch.zeros(0, 2 * dim, device=env.device)
    all_ids, own = _gather(local_ids, env)
    all_vec, _ = _gather(local_vec, env)
    return Queries(all_ids[:, 0], all_ids[:, 1], all_ids[:, 2], all_vec[:, :dim], all_vec[:, dim:], own)


@dataclasses.dataclass
class _Group:
    """The queries of one (side, relation): positions `index` [n] into Queries, and their known pairs."""

    side: str
    relation: int
    table: int  # the target table
    index: torch.Tensor
    anchors: torch.Tensor  # [n] the given end's ids
    targets: torch.Tensor  # [n] the true row of the target table
    known: list = dataclasses.field(default_factory=list)  # (anchor, candidate) parts while reading
    codes: torch.Tensor | None = None  # sorted candidate * 2^31 + position: every excluded pair in my slice
    excluded: torch.Tensor | None = None  # [n] pairs excluded per query in my slice (the true one included)


def _groups(config: TwhinConfig, queries: Queries) -> list[_Group]:
    pairs = build.relation_tables(config)
    groups = []
    for side in SIDES:
        for r, (lhs_table, rhs_table) in enumerate(pairs):
            index = torch.nonzero(queries.rel == r).squeeze(1)
            if side == "rhs":
                anchors, targets, table = queries.lhs, queries.rhs, rhs_table
            else:
                anchors, targets, table = queries.rhs, queries.lhs, lhs_table
            groups.append(_Group(side, r, table, index, anchors[index].cpu(), targets[index].cpu()))
    return groups


def _given(model, group: _Group, queries: Queries) -> torch.Tensor:
    """[n, D] what the group's candidates are compared with: lhs (side rhs) or op_r(rhs) (side lhs)."""
    if group.side == "rhs":
        return queries.lhs_vec[group.index]
    return model.relations(queries.rel[group.index], queries.rhs_vec[group.index])


def _filter(groups: list[_Group], inputs: list[str], config: TwhinConfig, vocabularies, env: DistEnv) -> None:
    """Fill each group's excluded (query, candidate) pairs of this rank's slices (module docstring)."""
    rows = [t.num_embeddings for t in config.model.embeddings.tables]
    slices = [rank_slice(n, env) for n in rows]
    wanted = [torch.unique(g.anchors) for g in groups]
    relations = build.relation_vocabularies(config, vocabularies)
    for pattern in inputs:
        edges = build_edge_dataset(
            pattern, build.decoder_relations(config), _FILTER_BATCH, num_epochs=1, shuffle=False,
            vocabularies=relations,
        )  # fmt: skip
        for batch in edges:
            for group, anchors in zip(groups, wanted, strict=True):
                if not len(anchors):
                    continue
                given, other = (batch.lhs, batch.rhs) if group.side == "rhs" else (batch.rhs, batch.lhs)
                lo, hi = slices[group.table]
                keep = (batch.rel == group.relation) & (other >= lo) & (other < hi)
                keep &= torch.isin(given, anchors)
                if keep.any():
                    group.known.append((given[keep], other[keep]))
    for group in groups:
        lo, hi = slices[group.table]
        n = len(group.index)
        pairs = torch.cat([(a << _SHIFT) + c for a, c in group.known]) if group.known else torch.zeros(0)
        pairs = torch.unique(pairs.to(torch.int64))
        group.known = []
        # Expand each query's anchor to the known candidates of that anchor.
        first = torch.searchsorted(pairs, group.anchors << _SHIFT)
        last = torch.searchsorted(pairs, (group.anchors + 1) << _SHIFT)
        counts = last - first
        position = torch.repeat_interleave(torch.arange(n), counts)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        candidates = pairs[first[position] + torch.arange(int(counts.sum())) - starts] & _MASK
        # The true row is excluded too (it is what is being ranked), when it lies in this rank's slice.
        mine = (group.targets >= lo) & (group.targets < hi)
        true_pairs = (group.targets[mine] << _SHIFT) + torch.arange(n)[mine]
        codes = torch.cat([(candidates << _SHIFT) + position, true_pairs])
        group.codes = torch.unique(codes).to(env.device)
        group.excluded = torch.bincount(group.codes & _MASK, minlength=n).to(torch.float64)


def _score_groups(model, groups: list[_Group], queries: Queries, config: TwhinConfig, env, block: int):
    """counts [3, 2, Q] float64 (higher, tied, excluded) per side and query, summed over ranks."""
    q = len(queries.rel)
    counts = torch.zeros(3, len(SIDES), q, dtype=torch.float64, device=env.device)
    ops, comparator = model.relations, model.comparator
    true_scores = model.score(queries.lhs_vec, queries.rel, queries.rhs_vec)
    chunk_size = config.evaluation.candidate_chunk_size
    tables = config.model.embeddings.tables
    given = {id(g): _given(model, g, queries) for g in groups}
    bar = progress_bar(None, "eval/rank", env.rank)
    for t, table in enumerate(tables):
        mine = [g for g in groups if g.table == t and len(g.index)]
        if not mine:
            continue
        for first, chunk in table_chunks(model, t, table.num_embeddings, env, chunk_size):
            for group in mine:
                # Side rhs compares lhs with op_r(candidate); side lhs compares the candidate with op_r(rhs).
                candidates = ops.of_relation(group.relation, chunk) if group.side == "rhs" else chunk
                _count_block(
                    group, given[id(group)], candidates, first, true_scores, counts, comparator, block
                )
            bar.update(1)
    bar.close()
    for s, side in enumerate(SIDES):
        for group in groups:
            if group.side == side and len(group.index):
                counts[2, s, group.index.to(env.device)] += group.excluded.to(env.device)
    if env.world_size > 1:
        dist.all_reduce(counts)
    return counts


def _count_block(group: _Group, given, candidates, first, true_scores, counts, comparator, block) -> None:
    """Add the higher / tied counts of the group's queries against one chunk of candidates."""
    s = SIDES.index(group.side)
    bounds = torch.tensor([first << _SHIFT, (first + len(candidates)) << _SHIFT], device=group.codes.device)
    lo, hi = torch.searchsorted(group.codes, bounds).tolist()
    segment = group.codes[lo:hi]  # the excluded pairs whose candidate lies in this chunk
    seg_pos, seg_cand = segment & _MASK, (segment >> _SHIFT) - first
    index = group.index.to(given.device)
    for b0 in range(0, len(given), block):
        b1 = min(b0 + block, len(given))
        scores = pairwise(given[b0:b1], candidates, comparator)
        inside = (seg_pos >= b0) & (seg_pos < b1)
        scores[seg_pos[inside] - b0, seg_cand[inside]] = float("-inf")
        truth = true_scores[index[b0:b1]].unsqueeze(1)
        counts[0, s, index[b0:b1]] += (scores > truth).sum(1, dtype=torch.float64)
        counts[1, s, index[b0:b1]] += (scores == truth).sum(1, dtype=torch.float64)


def random_expectations(candidates: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per query, the expected reciprocal rank and hits of a uniformly random ranker over n candidates."""
    n = candidates.to(torch.float64).clamp(min=1)
    harmonic = torch.digamma(n + 1) + 0.5772156649015329  # H(n), Euler-Mascheroni constant
    out = {"random_mrr": harmonic / n}
    for k in KS:
        out[f"random_hits_at_{k}"] = torch.clamp(k / n, max=1.0)
    return out


def _results(name: str, config: TwhinConfig, queries: Queries, counts: torch.Tensor, env) -> dict[str, float]:
    rows = torch.tensor([t.num_embeddings for t in config.model.embeddings.tables], dtype=torch.float64)
    pairs = torch.tensor(build.relation_tables(config), dtype=torch.int64).reshape(-1, 2)
    rel = queries.rel.cpu()
    higher, tied, excluded = counts.cpu()
    ranks = 1.0 + higher + 0.5 * tied  # [2, Q]
    # The true row is among the excluded pairs; every other excluded row leaves the candidates.
    totals = torch.stack([rows[pairs[rel, 1]], rows[pairs[rel, 0]]])
    candidates = totals - (excluded - 1.0)
    expected = random_expectations(candidates)
    lo, hi = queries.own
    names = [r.name for r in config.model.relations]
    scopes = [(ALL_RELATIONS, None)] + [(n, i) for i, n in enumerate(names)]
    results = {}
    for scope, relation in scopes:
        chosen = torch.ones_like(rel, dtype=torch.bool) if relation is None else rel == relation
        for side in (None, *SIDES):
            sides = [0, 1] if side is None else [SIDES.index(side)]
            prefix = f"eval/{name}/" + (f"side={side}/" if side else "") + scope
            metrics = RankMetrics(KS)
            for s in sides:
                metrics.update_ranks(ranks[s, lo:hi][chosen[lo:hi]])
            values = metrics.compute()
            for key, value in values.items():
                results[f"{prefix}/{key}"] = value
            mask = torch.cat([chosen for _ in sides])
            count = int(mask.sum())
            for key, per_query in expected.items():
                value = torch.cat([per_query[s] for s in sides])[mask]
                results[f"{prefix}/{key}"] = float(value.mean()) if count else math.nan
            value = torch.cat([candidates[s] for s in sides])[mask]
            results[f"{prefix}/candidates"] = float(value.mean()) if count else math.nan
    return results


class LinkEvaluator:
    """`(module, step) -> metrics` of every validation partition (the TrainJob's evaluate callable).

    The known edges of each partition's queries are read once and reused by later evaluations of the same
    queries (only ids are kept: every vector is looked up afresh).
    """

    def __init__(self, config: TwhinConfig, env: DistEnv, vocabularies=None) -> None:
        self.config, self.env, self.vocabularies = config, env, vocabularies
        self._filters: dict[str, tuple[torch.Tensor, list[_Group]]] = {}

    def filter_inputs(self) -> list[str]:
        given = self.config.evaluation.filter_inputs
        if given is not None:
            return list(given)
        inputs = [self.config.train_data.inputs, *(p.inputs for p in self.config.validation_data.values())]
        return list(dict.fromkeys(inputs))

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, step: int) -> dict[str, float]:
        model = build.unwrap(module).model
        was_training = module.training
        module.eval()
        results = {}
        for name, section in self.config.validation_data.items():
            results.update(self.partition(model, name, section))
        module.train(was_training)
        return results

    def partition(self, model, name: str, section: EdgeInputConfig) -> dict[str, float]:
        env, config = self.env, self.config
        steps = config.training.num_eval_steps
        limit = None if steps is None or steps < 0 else steps
        dataset = build.build_edges(section, config, env, self.vocabularies, key=f"validation_data.{name}")
        every = config.training.eval_log_every_n
        queries = _read_queries(model, dataset, env, limit, f"eval/{name}", every)
        ids = torch.stack([queries.rel, queries.lhs, queries.rhs]).cpu()
        cached = self._filters.get(name)
        if cached is not None and torch.equal(cached[0], ids):
            groups = cached[1]
        else:
            groups = _groups(config, queries)
            _filter(groups, self.filter_inputs(), config, self.vocabularies, env)
            self._filters[name] = (ids, groups)
        block = max(1, section.global_batch_size // env.world_size)
        counts = _score_groups(model, groups, queries, config, env, block)
        return _results(name, config, queries, counts, env)


def print_table(results: dict[str, float]) -> str:
    """One table per partition: a row per relation and side, a column per metric."""
    return eval_tables(results)
