"""The attribution graph of one prompt: nodes in circuit-tracer order and their direct-effect adjacency."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import data
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
    n_active_features: int  # active features before the max_feature_nodes cap
    logit_tokens: Tensor  # [n_logits] token ids of the logit nodes; index 0 is the target
    logit_probs: Tensor  # [n_logits] their probabilities in the original model
    logit_strings: list[str]  # the logit tokens decoded
    adjacency: Tensor  # [N, N] direct effects, row = target, column = source
    sample: data.Sample | None = None  # the sample attributed (image and ground truth, for figures)

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
              batch_size: int = 128) -> AttributionGraph:
    """Attribution graph of the sample's prompt at its last position (the first answer token).

    target_token: a token id to attribute (e.g. the true answer's first token), put first among the
        logit nodes; by default the model's top token is first.
    max_feature_nodes: cap on feature nodes. With more active features, the top ones by
        activation x decoder norm are kept and the rest are folded into the error nodes (the
        identities stay exact; `n_active_features` tells how many there were). Lower k or raise the
        cap when error nodes dominate.
    batch_size: targets per backward pass: the frozen forward runs on batch_size copies of the
        prompt, so memory grows like batch_size x S x d x (a few tensors per layer); lower it on
        long prompts of large models.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    local = LocalReplacement(loaded, clt, sample, max_feature_nodes)
    rec = local.recorded
    logit_tokens, logit_probs = _logit_targets(rec.logits[-1], target_token, max_n_logits, desired_logit_prob)
    adjacency = _adjacency(local, logit_tokens, batch_size)
    tokenizer = loaded.processor.tokenizer
    return AttributionGraph(
        prompt=data.sample_prompt(sample), tokens=tokenizer.convert_ids_to_tokens(rec.input_ids.tolist()),
        input_ids=rec.input_ids, image_positions=rec.input_ids == loaded.image_token_id, n_layers=len(local.blocks),
        features=local.features, activations=local.activations, n_active_features=local.n_active_features,
        logit_tokens=logit_tokens, logit_probs=logit_probs,
        logit_strings=[tokenizer.decode([t]).strip() for t in logit_tokens.tolist()], adjacency=adjacency, sample=sample)


def _adjacency(local: LocalReplacement, logit_tokens: Tensor, batch_size: int) -> Tensor:
    """Dense [N, N] direct effects: one frozen forward over batch_size copies, then one backward per batch of targets.

    Copy b is seeded with the b-th target of the batch (its read vector at its input site, or the
    demeaned logit direction); gradients are read at the write points (layer-0 input, each layer's
    MLP output) and dotted with each source's write vector there.
    """
    rec, L, n_f, device = local.recorded, len(local.blocks), len(local.features), local.device
    S, d = rec.embeds.shape
    n_targets = n_f + len(logit_tokens)
    B = min(batch_size, n_targets)
    embeds = rec.embeds.to(device).clone().requires_grad_()
    writes = (local._feature_writes(torch.ones(n_f, device=device)) + local.errors).detach().requires_grad_()
    points = [embeds.expand(B, S, d)] + [w.expand(B, S, d) for w in writes]  # per-copy gradients land here
    inputs, final = local.forward(points[0], points[1:])
    last = _linear(local.lm_head, final[:, -1])
    centered = last - last.mean(-1, keepdim=True)  # [B, V] demeaned logits
    decoders = _dense_decoders(local)
    adjacency = torch.zeros(n_targets + L * S + S, n_targets + L * S + S)
    n_sources = n_f + L * S + S
    target_rows = torch.cat([torch.arange(n_f), torch.arange(n_sources, n_sources + len(logit_tokens))])
    for start in range(0, n_targets, B):
        chunk = torch.arange(start, min(start + B, n_targets))
        seeded = _seeded_targets(local, inputs, centered, chunk, logit_tokens)
        grad_embeds, *grad_writes = (g[: len(chunk)] for g in torch.autograd.grad(seeded, points, retain_graph=True))
        grad_writes = torch.stack(grad_writes, dim=1)  # [batch, L, S, d]
        rows = torch.cat([_feature_edges(local, grad_writes, decoders),
                          (grad_writes * local.errors).sum(-1).flatten(1),
                          (grad_embeds * embeds.detach()).sum(-1)], dim=1)
        adjacency[target_rows[chunk], :n_sources] = rows.cpu()
    return adjacency


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


def _dense_decoders(local: LocalReplacement) -> Tensor:
    """[n_f, L, d] each feature's write vector at every target (zero where it does not write)."""
    L, d = len(local.blocks), local.recorded.embeds.shape[1]
    dense = torch.zeros(len(local.features), L, d, device=local.device)
    for t, (ids, _, vectors) in enumerate(local.write_vectors):
        dense[ids, t] = vectors
    return dense


def _feature_edges(local: LocalReplacement, grad_writes: Tensor, decoders: Tensor) -> Tensor:
    """[B, n_f] gradient at each feature's MLP-output write points dotted with its writes, one matmul per position."""
    batch, L, S, d = grad_writes.shape
    edges = grad_writes.new_zeros(batch, len(local.features))
    positions = local.features[:, 1].to(local.device)
    for p in positions.unique().tolist():
        ids = (positions == p).nonzero(as_tuple=True)[0]
        edges[:, ids] = grad_writes[:, :, p].reshape(batch, L * d) @ decoders[ids].reshape(len(ids), L * d).T
    return edges
