"""The attribution graph of one prompt: nodes in circuit-tracer order and their direct-effect adjacency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import data
from ..choices import Convention
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from .local import LocalReplacement, _linear


@dataclass
class AttributionGraph:
    """Nodes, direct-effect adjacency and metadata of one prompt's attribution graph (circuit-tracer order)."""

    prompt: str  # the chat prompt attributed
    tokens: list[str]  # one string per position (image patches appear as <image>)
    input_ids: Tensor  # [S] token ids
    image_positions: Tensor  # [S] bool: positions holding image patches (row-major patch order)
    n_layers: int  # decoder layers L
    features: Tensor  # [n_f, 3] (layer, position, latent id) of the kept active features, sorted
    activations: Tensor  # [n_f] their activations
    n_active_features: int  # active features before the max_feature_nodes cap (BOS excluded under "circuit-tracer")
    logit_tokens: Tensor  # [n_logits] token ids of the logit nodes; index 0 is the target
    logit_probs: Tensor  # [n_logits] their probabilities in the original model
    logit_strings: list[str]  # the logit tokens decoded
    adjacency: Tensor  # [N, N] direct effects, row = target, column = source
    sample: data.Sample | None = None  # the sample attributed (image and ground truth, for figures)
    convention: Convention = "circuit-tracer"  # what no node explains, and how the cap chose features (local.py)

    @property
    def n_positions(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + self.n_layers * self.n_positions

    @property
    def logit_start(self) -> int:
        return self.embed_start + self.n_positions

    @property
    def n_nodes(self) -> int:
        return self.logit_start + len(self.logit_tokens)

    def error_index(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_positions + position

    def patch_nodes(self) -> Tensor:
        """Node indices of the image-patch embeddings, in row-major patch order."""
        return self.embed_start + self.image_positions.nonzero(as_tuple=True)[0]

    def node_kind(self, index: int) -> str:
        """'feature', 'error', 'embedding' or 'logit'."""
        starts = [(self.logit_start, "logit"), (self.embed_start, "embedding"), (self.error_start, "error")]
        return next((kind for start, kind in starts if index >= start), "feature")

    def node_label(self, index: int, labels: dict[tuple[int, int], str] | None = None) -> str:
        """Short human label: 'L2 #17 @5', 'err L1 @5', 'patch 3,4', a token, or 'logit "red"'."""
        kind = self.node_kind(index)
        if kind == "feature":
            layer, pos, latent = self.features[index].tolist()
            return (labels or {}).get((layer, latent), f"L{layer} #{latent} @{pos}")
        if kind == "error":
            layer, pos = divmod(index - self.error_start, self.n_positions)
            return f"err L{layer} @{pos}"
        if kind == "embedding":
            pos = index - self.embed_start
            if self.image_positions[pos]:
                side = max(1, round(int(self.image_positions.sum()) ** 0.5))
                return "patch {},{}".format(*divmod(int(self.image_positions[:pos].sum()), side))
            return self.tokens[pos]
        return f'logit "{self.logit_strings[index - self.logit_start]}"'

    def node_position(self, index: int) -> tuple[int, int]:
        """(context position, layer) for drawing: embeddings at layer -1, logits at layer L."""
        kind = self.node_kind(index)
        if kind == "feature":
            layer, pos, _ = self.features[index].tolist()
            return pos, layer
        if kind == "error":
            layer, pos = divmod(index - self.error_start, self.n_positions)
            return pos, layer
        if kind == "embedding":
            return index - self.embed_start, -1
        return self.n_positions - 1, self.n_layers


def _logit_targets(logits: Tensor, target_token: int | None, max_n_logits: int, desired_logit_prob: float) -> tuple[Tensor, Tensor]:
    """Top tokens at the last position until their probability reaches desired_logit_prob (at most max_n_logits);
    a given target token is put first, whatever its probability."""
    probs = logits.softmax(-1)
    top = probs.topk(min(max_n_logits, len(probs)))
    n = int((top.values.cumsum(0) < desired_logit_prob).sum()) + 1
    tokens = top.indices[: min(n, max_n_logits)]
    if target_token is not None:
        if not 0 <= target_token < len(probs):
            raise ValueError(f"target_token {target_token} outside the vocabulary (0..{len(probs) - 1})")
        tokens = torch.cat([torch.tensor([target_token]), tokens[tokens != target_token]])[:max_n_logits]
    return tokens, probs[tokens]


def attribute(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, target_token: int | None = None,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95, max_feature_nodes: int = 4096,
              batch_size: int = 128, convention: Convention = "circuit-tracer") -> AttributionGraph:
    """Attribution graph of the sample's prompt at its last position (the first answer token).

    A sample without an image is a text-only prompt (then no node is an image patch).
    target_token: a token id to attribute (e.g. the true answer's first token), put first among the
        logit nodes; by default the model's top token is first.
    max_feature_nodes: cap on feature nodes. Under "circuit-tracer" (the default) the features are chosen as
        circuit-tracer chooses them: logit rows first, then feature rows in order of influence on the logits
        (re-ranked every 4 batches from the rows computed so far); the rest are dropped. Under "clt-lite" the top
        ones by activation x decoder norm are kept and the rest folded into the error nodes (the identities stay
        exact). `n_active_features` tells how many there were.
    batch_size: targets per backward pass: the frozen forward runs on batch_size copies of the
        prompt, so memory grows like batch_size x S x d x (a few tensors per layer); lower it on
        long prompts of large models.
    convention: "circuit-tracer" or "clt-lite", see local.py.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    local = LocalReplacement(loaded, clt, sample, max_feature_nodes, convention)
    rec = local.recorded
    logit_tokens, logit_probs = _logit_targets(rec.logits[-1], target_token, max_n_logits, desired_logit_prob)
    adjacency, kept = _adjacency(local, logit_tokens, logit_probs, batch_size, max_feature_nodes)
    tokenizer = loaded.processor.tokenizer
    return AttributionGraph(
        prompt=data.sample_prompt(sample), tokens=tokenizer.convert_ids_to_tokens(rec.input_ids.tolist()),
        input_ids=rec.input_ids, image_positions=rec.input_ids == loaded.image_token_id, n_layers=len(local.blocks),
        features=local.features[kept], activations=local.activations[kept], n_active_features=local.n_active_features,
        logit_tokens=logit_tokens, logit_probs=logit_probs,
        logit_strings=[tokenizer.decode([t]).strip() for t in logit_tokens.tolist()], adjacency=adjacency, sample=sample,
        convention=convention)


class _Rows:
    """Direct-effect rows of chosen targets, each over every source, from batched backward passes.

    Targets are numbered features first (0..n_f-1), then logits. A frozen forward over `copies` copies of the prompt;
    copy b is seeded with the b-th target of a batch (its read vector at its input site, or the demeaned logit
    direction); gradients are read at the write points (layer-0 input, each layer's MLP output) and dotted with each
    source's write vector there. Full batches share one forward over B copies; a shorter batch (the logit rows, the
    last batch) gets a forward of its own size, since a backward costs as many copies as its forward has.
    """

    def __init__(self, local: LocalReplacement, logit_tokens: Tensor, batch_size: int, n_rows: int):
        rec, self.local, self.logit_tokens = local.recorded, local, logit_tokens
        S = rec.embeds.shape[0]
        self.n_f = len(local.features)
        self.n_sources = self.n_f + len(local.blocks) * S + S
        self.B = min(batch_size, n_rows)  # copies of the prompt: no more than the rows that will be computed
        self.embeds = rec.embeds.to(local.device).clone().requires_grad_()
        self.writes = (local._feature_writes(torch.ones(self.n_f, device=local.device)) + local.errors).detach().requires_grad_()
        self.decoders = _decoders_by_position(local)
        self.forwards: dict[int, tuple[list[Tensor], list[Tensor], Tensor]] = {}

    def _forward(self, copies: int) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """(write points, input sites, demeaned last logits [copies, V]) of a frozen forward over `copies` copies; the
        full-batch one is kept for every later batch, a shorter one only until the next call."""
        if copies not in self.forwards:
            if copies != self.B:
                self.forwards = {self.B: self.forwards[self.B]} if self.B in self.forwards else {}
            S, d = self.embeds.shape
            points = [self.embeds.expand(copies, S, d)] + [w.expand(copies, S, d) for w in self.writes]  # per-copy gradients
            inputs, final = self.local.forward(points[0], points[1:])
            last = _linear(self.local.lm_head, final[:, -1])
            self.forwards[copies] = (points, inputs, last - last.mean(-1, keepdim=True))
        return self.forwards[copies]

    def __call__(self, targets: Tensor) -> Tensor:
        """[len(targets), n_sources] rows, in batches of at most B."""
        local, n_f = self.local, self.n_f
        out = torch.empty(len(targets), self.n_sources)
        for start in range(0, len(targets), self.B):
            chunk = targets[start : start + self.B]
            points, inputs, centered = self._forward(len(chunk))
            seeded = _seeded_targets(local, inputs, centered, chunk, self.logit_tokens)
            grad_embeds, *grad_writes = torch.autograd.grad(seeded, points, retain_graph=True)
            rows = out[start : start + len(chunk)]
            rows[:, n_f:-len(self.embeds)] = torch.stack([(g * e).sum(-1) for g, e in zip(grad_writes, local.errors)], 1).flatten(1).cpu()
            rows[:, -len(self.embeds):] = (grad_embeds * self.embeds.detach()).sum(-1).cpu()
            rows[:, :n_f] = _feature_edges(torch.stack(grad_writes, dim=2), self.decoders).cpu()  # stacked [batch, S, L, d]
        return out


def _adjacency(local: LocalReplacement, logit_tokens: Tensor, logit_probs: Tensor, batch_size: int,
               max_feature_nodes: int, update_interval: int = 4) -> tuple[Tensor, Tensor]:
    """(dense [N, N] direct effects with row = target and column = source, the feature ids kept).

    Without a cap to apply (all features fit, or "clt-lite" already folded the rest), every feature gets a row.
    Otherwise circuit-tracer's order: logit rows, then batches of the features most influential on the logits so
    far (re-ranked every `update_interval` batches), until the cap; columns of features never chosen are dropped.
    """
    n_f = len(local.features)
    rows_of = _Rows(local, logit_tokens, batch_size, min(n_f, max_feature_nodes) + len(logit_tokens))
    logit_rows = rows_of(n_f + torch.arange(len(logit_tokens)))
    if n_f <= max_feature_nodes:
        kept, feature_rows = torch.arange(n_f), rows_of(torch.arange(n_f))
    else:
        visited, chosen, parts = torch.zeros(n_f, dtype=torch.bool), [], []
        while int(visited.sum()) < max_feature_nodes:
            done = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
            influences = _partial_influence(torch.cat([logit_rows, *parts]), logit_probs,
                                            torch.cat([rows_of.n_sources + torch.arange(len(logit_tokens)), done]))
            rank = torch.argsort(influences[:n_f], descending=True)
            pending = rank[~visited[rank]][: min(update_interval * rows_of.B, max_feature_nodes - int(visited.sum()))]
            for batch in pending.split(rows_of.B):
                parts.append(rows_of(batch))
                chosen.append(batch)
                visited[batch] = True
        order = torch.cat(chosen)
        kept = order.sort().values
        feature_rows = torch.cat(parts)[torch.argsort(order)]
    columns = torch.cat([kept, torch.arange(n_f, rows_of.n_sources)])
    n_kept, n_sources = len(kept), len(columns)
    adjacency = torch.zeros(n_sources + len(logit_tokens), n_sources + len(logit_tokens))
    adjacency[:n_kept, :n_sources] = feature_rows[:, columns]
    adjacency[n_sources:, :n_sources] = logit_rows[:, columns]
    return adjacency, kept


def _partial_influence(rows: Tensor, logit_probs: Tensor, row_nodes: Tensor) -> Tensor:
    """circuit-tracer's influence of every source on the logits from the rows computed so far ([n_rows, n_sources],
    row r belongs to node row_nodes[r]; logit nodes are numbered after the sources)."""
    normalized = rows.abs()
    normalized = normalized / normalized.sum(1, keepdim=True).clamp(min=1e-8)
    n_sources, n_logits = rows.shape[1], len(logit_probs)
    prod = torch.zeros(n_sources + n_logits)
    prod[n_sources:] = logit_probs
    influences = torch.zeros(n_sources)
    for _ in range(len(rows) + 1):
        current = prod[row_nodes] @ normalized
        if not current.any():
            return influences
        influences += current
        prod = torch.cat([current, torch.zeros(n_logits)])
    raise RuntimeError("influence did not converge: the rows have a cycle")


def _seeded_targets(local: LocalReplacement, inputs: list[Tensor], centered: Tensor, chunk: Tensor,
                    logit_tokens: Tensor) -> Tensor:
    """Sum over copies b of target chunk[b] evaluated in copy b (its gradient seeds each copy separately)."""
    n_f, device = len(local.features), local.device
    copies = torch.arange(len(chunk), device=device)
    is_feature = (chunk < n_f).to(device)
    total = centered.new_zeros(())
    layer, pos, latent = local.features[chunk[chunk < n_f]].unbind(1)
    for l in layer.unique().tolist():
        chosen = (layer == l).to(device)
        x = inputs[l][copies[is_feature][chosen], pos.to(device)[chosen]]
        total = total + (x * local.read_rows(l, latent[chosen.cpu()])).sum()
    tokens = logit_tokens.to(device)[(chunk[chunk >= n_f] - n_f).to(device)]
    return total + centered[copies[~is_feature], tokens].sum()


class _DecodersByPosition(NamedTuple):
    """Every feature's write vectors at the targets it writes, rows sorted by (position, layer) and cut into blocks of
    one position and a few layers: a block's rows are contiguous, and its features write nothing before its first
    layer, so its dot products skip those targets (about half of a full CLT's table is those zeros)."""

    weights: Tensor  # [n_f, L, d] write vectors (zero at targets before the feature's layer), rows in `order`
    order: Tensor  # feature ids (rows of local.features) sorted by position, then layer
    unsort: Tensor  # inverse of order: column j of a result in `order` belongs to feature unsort[j]
    blocks: list[tuple[int, int, int, int]]  # (position, first layer, first row, end row) of each block


LAYERS_PER_BLOCK = 8  # fewer: more, smaller matmuls; more: more of the zeros before a feature's layer multiplied


def _decoders_by_position(local: LocalReplacement) -> _DecodersByPosition:
    L, d = len(local.blocks), local.recorded.embeds.shape[1]
    layers, positions = (local.features[:, i].to(local.device) for i in (0, 1))
    order = torch.argsort(positions * L + layers, stable=True)
    unsort = torch.argsort(order)
    weights = torch.zeros(len(order), L, d, device=local.device)
    for t, (ids, _, vectors) in enumerate(local.write_vectors):
        weights[unsort[ids], t] = vectors
    keys = (positions * L + layers // LAYERS_PER_BLOCK * LAYERS_PER_BLOCK)[order]
    present, counts = torch.unique_consecutive(keys, return_counts=True)
    ends = counts.cumsum(0).tolist()
    blocks = [(*divmod(key, L), end - count, end) for key, count, end in zip(present.tolist(), counts.tolist(), ends)]
    return _DecodersByPosition(weights, order, unsort, blocks)


def _feature_edges(grad_writes: Tensor, decoders: _DecodersByPosition) -> Tensor:
    """[B, n_f] gradient at each feature's MLP-output write points (grad_writes [B, S, L, d]) dotted with its writes,
    one matmul per block over the targets from the block's first layer on."""
    batch = grad_writes.shape[0]
    edges = grad_writes.new_empty(batch, len(decoders.order))
    for p, first, start, end in decoders.blocks:
        edges[:, start:end] = grad_writes[:, p, first:].flatten(1) @ decoders.weights[start:end, first:].flatten(1).T
    return edges[:, decoders.unsort]


def _graph_rows(local: LocalReplacement, graph: AttributionGraph) -> Tensor:
    """Index in local.features of each of the graph's features (both sorted by layer, position, latent)."""
    S, n = graph.n_positions, local.clt.config.num_latents
    key = lambda f: (f[:, 0] * S + f[:, 1]) * n + f[:, 2]  # noqa: E731
    rows = torch.searchsorted(key(local.features), key(graph.features))
    if not torch.equal(local.features[rows.clamp(max=len(local.features) - 1)], graph.features):
        raise ValueError("the graph's features are not among the local replacement's: build both from the same "
                         "prompt, CLT and convention")
    return rows


def _targets(local: LocalReplacement, graph: AttributionGraph, out) -> Tensor:
    """[n_f + n_logits] the graph's target rows read from a frozen run: feature pre-activations minus b_enc, logits
    minus the mean logit."""
    last = out.logits[-1]
    return torch.cat([local.feature_reads(out.inputs)[_graph_rows(local, graph)],
                      (last - last.mean())[graph.logit_tokens.to(last.device)]]).cpu()


@torch.no_grad()
def target_values(local: LocalReplacement, graph: AttributionGraph) -> Tensor:
    """[n_f + n_logits] what each target row of the graph measures in the frozen model: a feature's pre-activation
    minus its encoder bias, a logit minus the mean logit."""
    return _targets(local, graph, local.run())


@torch.no_grad()
def uncredited(local: LocalReplacement, graph: AttributionGraph) -> Tensor:
    """[n_f + n_logits] the part of each target no node of the graph is credited with: the constant of the
    "circuit-tracer" convention (b_dec, every MLP output at BOS) and the features the cap dropped. So for every
    target row, incoming edges + uncredited = target_values (zero under "clt-lite", where errors absorb both)."""
    L, S = graph.n_layers, graph.n_positions
    dropped = torch.ones(len(local.features))
    dropped[_graph_rows(local, graph)] = 0
    return _targets(local, graph, local.run(feature_scale=dropped, error_scale=torch.zeros(L, S),
                                            embed_scale=torch.zeros(S)))
