"""Attribution graphs: from image patches and text tokens, through CLT features, to answer logits.

For one prompt we build the *local replacement model* (Ameisen et al. 2025): the original
forward pass with every MLP output replaced by the CLT's active features' decoder writes plus
an error term (original mlp_out minus those writes), attention patterns and RMSNorm
denominators frozen at their values from the real pass. Given that freezing, the model is
*linear* in its sources (input embeddings, feature activations, error vectors), and it
reproduces the original logits (exactly up to float32 rounding; it computes in float32 even for
bfloat16 models, so there it matches to bfloat16 precision).

The graph's edge source -> target is the source's direct effect on the target through that
frozen model, "direct" meaning not through another feature (feature activations are leaves).
Targets are features (their encoder pre-activation) and the top output logits (demeaned, as in
circuit-tracer). Node order follows circuit-tracer:

    [features (layer, position, latent)] [errors: layer-major, L*S] [embeddings: S] [logits]

and adjacency[target, source]. Linearity gives exact identities the tests check:

    pre-activation(feature) = sum of its incoming edges + b_enc
    logit(token) - mean logit = sum of its incoming edges          (no constant: Llama's attention has no biases)

Edges come from batched backward passes (as circuit-tracer does): the frozen forward runs on a
batch of copies of the prompt, copy b is seeded with target b's read vector, and the gradient at
each write point (layer-0 input, every MLP output) dotted with a source's write vector there is
the edge weight. Feature activations never get gradients: they are leaves, so paths stop at them.

Choices: the cap on feature nodes keeps the strongest features and folds the rest into the
error nodes (nothing is refused and the identities stay exact); images of any size are accepted (the
processor resizes them, as LLaVA does); the CLT's skip connection, if any, stays a live linear
path (like attention) rather than part of the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, sites
from .clt import CrossLayerTranscoder
from .files import write_json
from .models import LoadedModel
from .replacement import check_compatible

SINGLE_OBJECT_FAMILIES = ("colour", "shape", "describe")  # questions about exactly one object


# ------------------------------------------------------------------------- the real forward pass


class Recorded(NamedTuple):
    """What one real forward pass of one prompt leaves behind (float32, batch dimension dropped)."""

    input_ids: Tensor  # [S] token ids (image token repeated once per patch)
    embeds: Tensor  # [S, d] embeddings as they enter the language model (image patches merged in)
    inputs: Tensor  # [L, S, d] the CLT's input site (resid_mid or mlp_in), raw units
    mlp_out: Tensor  # [L, S, d] MLP outputs
    logits: Tensor  # [S, V] final logits


def _language_model(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (LlamaModel): it has .layers, .norm, .rotary_emb."""
    layers = sites.decoder_layers(model)
    for module in model.modules():
        if getattr(module, "layers", None) is layers:
            return module
    raise ValueError(f"{type(model).__name__}: cannot find the language model owning the decoder layers")


def _encode_sample(loaded: LoadedModel, sample: data.Sample) -> data.EncodedBatch:
    if sample.image is None:
        raise ValueError("attribution traces from image patches: give the sample an image")
    return data.encode_batch(loaded.processor, [sample])


@torch.no_grad()
def record(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample) -> Recorded:
    """Run the real model once on the sample's prompt and keep what the local replacement needs.

    Images of another size are accepted: the processor resizes and centre-crops them to the
    vision tower's input, as LLaVA does with any photo.
    """
    model = loaded.model
    encoded = _encode_sample(loaded, sample)
    kept: dict[str, Tensor] = {}

    def keep_embeds(_module, args, kwargs):
        kept["embeds"] = kwargs["inputs_embeds"].detach()

    site = clt.config.input_site
    handle = _language_model(model).register_forward_pre_hook(keep_embeds, with_kwargs=True)
    try:
        with sites.capture(model, sites=(site, "mlp_out")) as captured:
            logits = model(**encoded.model_inputs(model)).logits
    finally:
        handle.remove()
    return Recorded(encoded.input_ids[0], kept["embeds"][0].float().cpu(), captured.stack(site)[0].transpose(0, 1).float(),
                    captured.stack("mlp_out")[0].transpose(0, 1).float(), logits[0].float().cpu())


# -------------------------------------------------------------------- the local replacement model


def _linear(module: nn.Linear, x: Tensor) -> Tensor:
    """module(x) in float32 whatever the model's dtype (attribution needs the precision)."""
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x, module.weight.float(), bias)


class Frozen(NamedTuple):
    """Nonlinear quantities of the real pass, held fixed so the model becomes linear."""

    attn_rsqrt: Tensor  # [L, S, 1] input_layernorm's 1/sqrt(mean square + eps)
    mlp_rsqrt: Tensor  # [L, S, 1] post_attention_layernorm's (used when the CLT reads mlp_in)
    final_rsqrt: Tensor  # [S, 1] the final norm's
    patterns: list[Tensor]  # per layer [H, S, S] attention probabilities


class FrozenRun(NamedTuple):
    """Output of the frozen model."""

    inputs: list[Tensor]  # per layer [S, d] the CLT's input site
    logits: Tensor  # [S, V]


def _rsqrt(h: Tensor, norm: nn.Module) -> Tensor:
    return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


class LocalReplacement:
    """The frozen, linear model of one prompt with the CLT's features as leaves.

    Sources and their write points: embeddings at the layer-0 input, feature f at mlp_out[t][p_f]
    for every target t it writes (a_f W_dec[s->t] / target_scale[t]), error (t, p) at mlp_out[t][p].
    `run` scales each source by a coefficient (1 = the real pass); that is also how linear
    interventions on the frozen model are made.
    """

    def __init__(self, loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample,
                 max_feature_nodes: int = 4096):
        if max_feature_nodes < 1:
            raise ValueError(f"max_feature_nodes must be >= 1, got {max_feature_nodes}")
        check_compatible(clt, loaded.model)
        self.clt = clt
        self.blocks = sites.decoder_layers(loaded.model)
        self.lm = _language_model(loaded.model)
        self.lm_head = loaded.model.get_output_embeddings()
        self.device = next(loaded.model.parameters()).device
        self.recorded = record(loaded, clt, sample)
        S = self.recorded.embeds.shape[0]
        embeds = self.recorded.embeds[None].to(self.device)
        self.rotary = self.lm.rotary_emb(embeds, torch.arange(S, device=self.device)[None])
        self.causal = torch.full((S, S), float("-inf"), device=self.device).triu(1)
        self.frozen = self._record_frozen()
        self._select_features(max_feature_nodes)

    # -------------------------------------------------------------------------------- features
    @torch.no_grad()
    def _select_features(self, cap: int) -> None:
        """Active features from the recorded inputs; keep at most `cap`, ranked by activation x raw decoder norm.

        Dropped features' writes stay in the error terms, so every identity still holds exactly.
        """
        clt, rec = self.clt, self.recorded
        scale = clt.input_scale.float()[:, None, None].cpu()
        x = (rec.inputs * scale).transpose(0, 1).to(clt.b_dec.device, clt.b_dec.dtype)  # [S, L, d]
        enc = clt.encode(x)
        values, indices = enc.values.float().cpu(), enc.indices.cpu()  # [S, L, k']
        pos, layer, slot = (values > 0).nonzero(as_tuple=True)
        latent = indices[pos, layer, slot]
        acts = values[pos, layer, slot]
        self.n_active_features = len(acts)
        norms = self._raw_decoder_norms(layer, latent)
        keep = (acts * norms).topk(min(cap, len(acts))).indices
        n, S = clt.config.num_latents, x.shape[0]
        keep = keep[torch.argsort((layer[keep] * S + pos[keep]) * n + latent[keep])]  # (layer, position, latent) order
        self.features = torch.stack([layer[keep], pos[keep], latent[keep]], dim=1)  # [n_f, 3] sorted
        self.activations = acts[keep]
        self.pre_acts = enc.pre_acts.float().cpu()[pos[keep], layer[keep], latent[keep]]
        self.write_vectors = self._write_vectors()
        writes = self._feature_writes(torch.ones(len(keep)))
        skip = torch.stack([self._skip(t, rec.inputs[t].to(self.device)) for t in range(len(self.blocks))])
        self.errors = rec.mlp_out.to(self.device) - writes - skip  # [L, S, d]: absorbs b_dec and dropped features

    @torch.no_grad()
    def _raw_decoder_norms(self, layer: Tensor, latent: Tensor) -> Tensor:
        """Norm of each listed latent's raw-unit decoder writes, concatenated over its targets."""
        out_scale = self.clt.target_scale.float()
        per_latent = torch.stack([
            (W.detach().float().pow(2).sum(-1) / out_scale[s : s + W.shape[1]].to(W.device).pow(2)).sum(-1).sqrt().cpu()
            for s, W in enumerate(self.clt.W_dec)])  # [L, n]
        return per_latent[layer, latent]

    @torch.no_grad()
    def _write_vectors(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per target t: (feature ids writing to t, their positions, a_f W_dec[s_f->t] / target_scale[t])."""
        clt = self.clt
        layer, pos, latent = self.features.unbind(1)
        by_target: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(clt.config.n_layers)]
        for s, W in enumerate(clt.W_dec):
            ids = (layer == s).nonzero(as_tuple=True)[0]
            rows = W.detach()[latent[ids].to(W.device)].float().to(self.device)  # [m_s, n_targets(s), d]
            rows = rows * self.activations[ids, None, None].to(self.device)
            for offset in range(W.shape[1]):
                by_target[s + offset].append((ids, rows[:, offset] / clt.target_scale[s + offset].float()))
        out = []
        for parts in by_target:
            ids = torch.cat([i for i, _ in parts])
            out.append((ids.to(self.device), pos[ids].to(self.device), torch.cat([v for _, v in parts])))
        return out

    def _feature_writes(self, feature_scale: Tensor) -> Tensor:
        """[L, S, d] sum of the features' decoder writes, each scaled by its coefficient."""
        S, d = self.recorded.embeds.shape
        parts = []
        for ids, pos, vectors in self.write_vectors:
            scaled = feature_scale.to(self.device)[ids, None] * vectors
            parts.append(torch.zeros(S, d, device=self.device, dtype=scaled.dtype).index_add(0, pos, scaled))
        return torch.stack(parts)

    def _skip(self, t: int, x: Tensor) -> Tensor:
        """The CLT's linear skip term of target t in raw units (zero without a skip connection)."""
        clt = self.clt
        if not clt.config.skip_connection:
            return torch.zeros_like(x)
        W = clt.W_skip[t].detach().float().to(x.device)
        return (x * clt.input_scale[t].float()) @ W / clt.target_scale[t].float()

    # ----------------------------------------------------------------------------- the forward
    @torch.no_grad()
    def _record_frozen(self) -> Frozen:
        """Recompute the real pass manually (real MLP outputs) and keep its norms and attention patterns."""
        rec = self.recorded
        h = rec.embeds.to(self.device)
        attn_rs, mlp_rs, patterns = [], [], []
        for l, block in enumerate(self.blocks):
            attn_rs.append(_rsqrt(h, block.input_layernorm))
            a_in = h * attn_rs[-1] * block.input_layernorm.weight.float()
            patterns.append(self._pattern(block.self_attn, a_in))
            h = h + self._attend(block.self_attn, a_in, patterns[-1])
            mlp_rs.append(_rsqrt(h, block.post_attention_layernorm))
            h = h + rec.mlp_out[l].to(self.device)
        return Frozen(torch.stack(attn_rs), torch.stack(mlp_rs), _rsqrt(h, self.lm.norm), patterns)

    def _pattern(self, attn: nn.Module, a_in: Tensor) -> Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        S = a_in.shape[0]
        q = _linear(attn.q_proj, a_in).view(S, -1, attn.head_dim).transpose(0, 1)[None]
        k = _linear(attn.k_proj, a_in).view(S, -1, attn.head_dim).transpose(0, 1)[None]
        cos, sin = (r.float() for r in self.rotary)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        scores = q[0] @ k[0].transpose(1, 2) * attn.scaling + self.causal
        return scores.softmax(-1)

    def _attend(self, attn: nn.Module, a_in: Tensor, pattern: Tensor) -> Tensor:
        """Attention output with a fixed pattern [H, S, S] for inputs [..., S, d]."""
        *lead, S, _ = a_in.shape
        v = _linear(attn.v_proj, a_in).view(*lead, S, -1, attn.head_dim).transpose(-2, -3)
        v = v.repeat_interleave(attn.num_key_value_groups, dim=-3)
        return _linear(attn.o_proj, (pattern @ v).transpose(-2, -3).reshape(*lead, S, -1))

    def run(self, feature_scale: Tensor | None = None, error_scale: Tensor | None = None,
            embed_scale: Tensor | None = None) -> FrozenRun:
        """The frozen model with each source scaled: feature_scale [n_f], error_scale [L, S], embed_scale [S].

        All ones (the default) reproduces the original logits. Differentiable in the scales.
        """
        rec = self.recorded
        L, S = len(self.blocks), rec.embeds.shape[0]
        ones = lambda *shape: torch.ones(*shape, device=self.device)  # noqa: E731
        feature_scale = ones(len(self.features)) if feature_scale is None else feature_scale
        error_scale = ones(L, S) if error_scale is None else error_scale
        embed_scale = ones(S) if embed_scale is None else embed_scale
        writes = self._feature_writes(feature_scale) + error_scale.to(self.device)[..., None] * self.errors
        inputs, final = self.forward(embed_scale.to(self.device)[:, None] * rec.embeds.to(self.device), writes)
        return FrozenRun(inputs, _linear(self.lm_head, final))

    def forward(self, embeds: Tensor, writes: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Frozen model on embeds [..., S, d] with MLP outputs writes[l] [..., S, d] plus the CLT's skip term.

        Returns the CLT input site of every layer ([..., S, d] each) and the final normed residual.
        """
        fz, h, inputs = self.frozen, embeds, []
        for l, block in enumerate(self.blocks):
            a_in = h * fz.attn_rsqrt[l] * block.input_layernorm.weight.float()
            h = h + self._attend(block.self_attn, a_in, fz.patterns[l])
            x = h if self.clt.config.input_site == "resid_mid" else \
                h * fz.mlp_rsqrt[l] * block.post_attention_layernorm.weight.float()
            inputs.append(x)
            h = h + writes[l] + self._skip(l, x)
        return inputs, h * fz.final_rsqrt * self.lm.norm.weight.float()

    def read_rows(self, layer: int, latents: Tensor) -> Tensor:
        """[m, d] encoder rows x input_scale: a feature's pre-activation is row . x_layer[p] + b_enc."""
        clt = self.clt
        rows = clt.W_enc.detach()[layer][latents.to(clt.W_enc.device)].float().to(self.device)
        return rows * clt.input_scale[layer].float().to(self.device)

    def feature_reads(self, inputs: list[Tensor]) -> Tensor:
        """[n_f] each feature's pre-activation minus b_enc, read from the frozen model's input sites."""
        layer, pos, latent = self.features.unbind(1)
        reads = []
        for l, x in enumerate(inputs):
            chosen = (layer == l).nonzero(as_tuple=True)[0]
            reads.append((x[pos[chosen].to(self.device)] * self.read_rows(l, latent[chosen])).sum(-1))
        return torch.cat(reads)


# ------------------------------------------------------------------------------------ the graph


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


# ---------------------------------------------------------------------------- pruning and scores


def normalize_rows(matrix: Tensor) -> Tensor:
    """|A| with each row scaled to sum 1 (rows of zeros stay zero): each target's share from each source."""
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp(min=1e-10)


def influence(adjacency: Tensor, weights: Tensor) -> Tensor:
    """Total influence of every node on the weighted targets: w (A + A^2 + ...) = w ((I - A)^-1 - I), A row-normalised.

    The graph is acyclic (features only read earlier layers), so the series ends after at most
    depth-many terms; it is summed term by term like circuit-tracer.
    """
    A = normalize_rows(adjacency)
    current = weights @ A
    total = current.clone()
    for _ in range(len(A)):
        if not current.any():
            return total
        current = current @ A
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def _logit_weights(graph: AttributionGraph) -> Tensor:
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start :] = graph.logit_probs
    return weights


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """Smallest score among the top scores whose sum reaches `fraction` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(fraction))), len(ordered) - 1)]


class Pruned(NamedTuple):
    """Result of prune()."""

    node_mask: Tensor  # [N] nodes kept
    edge_mask: Tensor  # [N, N] edges kept (row = target, column = source)
    influence: Tensor  # [N] each node's influence on the logits (probability-weighted)
    cumulative: Tensor  # [N] fraction of total influence carried by nodes at least as influential


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning: keep the most influential nodes, then edges, then drop dangling nodes.

    Node influence on the logits (weighted by their probabilities) through the row-normalised
    |adjacency|; keep nodes carrying `node_threshold` of it (embeddings and logits are always kept,
    they are the graph's ends); among edges between kept nodes keep those carrying
    `edge_threshold` of edge influence; finally drop feature / error nodes left without outgoing
    edges, and features without incoming ones, until nothing changes.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    weights = _logit_weights(graph)
    node_influence = influence(graph.adjacency, weights)
    node_mask = node_influence >= _threshold(node_influence, node_threshold)
    node_mask[graph.embed_start :] = True
    pruned = graph.adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (influence(pruned, weights) + weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    inner = slice(0, graph.embed_start)  # features and errors
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        before = node_mask.clone()
        node_mask[inner] &= edge_mask[:, inner].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
        if torch.equal(before, node_mask):
            break
    ordered, order = node_influence.sort(descending=True)
    cumulative = torch.empty_like(node_influence)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return Pruned(node_mask, edge_mask, node_influence, cumulative)


class GraphScores(NamedTuple):
    """How much of the computation the graph explains with features (1 = no error nodes needed)."""

    replacement: float  # influence from embeddings / (from embeddings + from error nodes)
    completeness: float  # influence-weighted fraction of incoming edge weight that is not from error nodes


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness scores of Ameisen et al. (2025), as circuit-tracer computes them.

    Replacement: of the end-to-end influence on the logits that starts at embeddings or error
    nodes, the fraction starting at embeddings (paths end-to-end through features). Completeness:
    for every node, the fraction of its normalised incoming weight not from error nodes,
    averaged with weights = the node's influence on the logits (logits weighted by probability).
    """
    weights = _logit_weights(graph)
    node_influence = influence(graph.adjacency, weights)
    errors = slice(graph.error_start, graph.embed_start)
    from_errors = node_influence[errors].sum()
    from_embeddings = node_influence[graph.embed_start : graph.logit_start].sum()
    non_error = 1 - normalize_rows(graph.adjacency)[:, errors].sum(1)
    output = node_influence + weights
    return GraphScores(float(from_embeddings / (from_embeddings + from_errors)),
                       float((non_error * output).sum() / output.sum()))


def patch_influence(graph: AttributionGraph, logit: int = 0) -> Tensor:
    """[n_patches] influence of each image-patch embedding on one logit node (0 = the target), row-major."""
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start + logit] = 1.0
    return influence(graph.adjacency, weights)[graph.patch_nodes()]


def feature_influence(graph: AttributionGraph, logit: int = 0) -> Tensor:
    """[n_f] influence of each feature on one logit node (0 = the target)."""
    weights = torch.zeros(graph.n_nodes)
    weights[graph.logit_start + logit] = 1.0
    return influence(graph.adjacency, weights)[: graph.n_features]


# ----------------------------------------------------------------------- ground truth on ShapesWorld


def answer_token(loaded: LoadedModel, answer: str) -> int:
    """First token of ' answer' as the model is trained to produce it (as data.encode_batch tokenises answers)."""
    return loaded.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def gradient_x_input(loaded: LoadedModel, sample: data.Sample, token: int) -> Tensor:
    """[n_patches] |gradient x input| of the original model's logit for `token`, summed over the embedding dimension."""
    model = loaded.model
    encoded = _encode_sample(loaded, sample)
    kept: dict[str, Tensor] = {}

    def leaf_embeds(_module, args, kwargs):
        kept["embeds"] = kwargs["inputs_embeds"].detach().float().requires_grad_()
        return args, {**kwargs, "inputs_embeds": kept["embeds"].to(kwargs["inputs_embeds"].dtype)}

    handle = _language_model(model).register_forward_pre_hook(leaf_embeds, with_kwargs=True)
    try:
        logits = model(**encoded.model_inputs(model)).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, token], kept["embeds"])
    scores = (grad * kept["embeds"]).sum(-1)[0].abs().detach().cpu()
    return scores[encoded.input_ids[0] == loaded.image_token_id]


class FamilyHits(NamedTuple):
    graph: float  # hit rate of the attribution graph's top patch
    gradient: float  # hit rate of gradient x input's top patch
    n: int  # samples of this family


class GroundTruth(NamedTuple):
    """How often the most influential image patch lies in the asked-about object's cell."""

    graph_hit_rate: float  # attribution graph (influence of patch embeddings on the answer logit)
    gradient_hit_rate: float  # baseline: gradient x input on the original model
    n: int  # single-object samples evaluated
    per_family: dict[str, FamilyHits]  # the same per question family


def ground_truth_samples(loaded: LoadedModel, n: int, seed: int = 0) -> list[data.Sample]:
    """n held-out (test split) ShapesWorld questions about one object at the model's image geometry, the families taking turns."""
    per_family = [data.shapes_world(-(-n // len(SINGLE_OBJECT_FAMILIES)), "test", seed, loaded.world, family=f)
                  for f in SINGLE_OBJECT_FAMILIES]
    return [s for group in zip(*per_family) for s in group][:n]


def ground_truth_hit_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                          **attribute_kwargs) -> GroundTruth:
    """Attribute each single-object ShapesWorld sample (colour, shape, describe) to its answer's first token
    and check whether the top patch (graph influence; gradient x input baseline) falls in the object's cell
    (cells map to patches by the model's own geometry, `loaded.world`; render the samples with it).

    Other samples (count, exists, user data) are skipped: they have no single ground-truth cell.
    """
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for sample in samples:
        if sample.family not in SINGLE_OBJECT_FAMILIES or len(sample.target_cells) != 1:
            continue
        token = answer_token(loaded, sample.answer)
        graph = attribute(loaded, clt, sample, target_token=token, **attribute_kwargs)
        cell = set(loaded.world.cell_patches(sample.target_cells[0]))
        by_graph = int(patch_influence(graph).argmax()) in cell
        by_gradient = int(gradient_x_input(loaded, sample, token).argmax()) in cell
        hits.setdefault(sample.family, []).append((by_graph, by_gradient))
    if not hits:
        raise ValueError("no single-object samples (families colour, shape, describe) to evaluate; pass ShapesWorld samples")

    def rates(pairs: list[tuple[bool, bool]]) -> FamilyHits:
        return FamilyHits(sum(g for g, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs), len(pairs))

    per_family = {family: rates(pairs) for family, pairs in sorted(hits.items())}
    overall = rates([pair for pairs in hits.values() for pair in pairs])
    return GroundTruth(overall.graph, overall.gradient, overall.n, per_family)


# ------------------------------------------------------------------------------- interventions


class Intervention(NamedTuple):
    """Teacher-forced top token at the answer position before and after an intervention."""

    before: str  # the original model's top token
    after: str  # with the feature's activation scaled
    activation: float  # the feature's activation in the original pass (0: inactive, no effect)


def intervene(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, layer: int, position: int,
              feature: int, scale: float) -> Intervention:
    """Scale one feature's activation in the real (unfrozen) model and read the new top answer token."""
    return intervene_many(loaded, clt, sample, [(layer, position, feature)], scale)


def intervene_many(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample,
                   features: Sequence[tuple[int, int, int]], scale: float) -> Intervention:
    """Scale several features (layer, position, latent) at once in the real model; read the new answer token.

    For each feature, adds (scale - 1) a W_dec[layer->t] / target_scale[t] to mlp_out[t] at its
    position for every target t it writes, a being its activation in the original pass; everything
    downstream is recomputed by the real model. The answer is the argmax at the last prompt position
    (the first answer token). `activation` in the result is the summed activation of the features.
    """
    check_compatible(clt, loaded.model)
    return _intervene_recorded(loaded, clt, sample, record(loaded, clt, sample), features, scale)


def _intervene_recorded(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, rec: Recorded,
                        features: Sequence[tuple[int, int, int]], scale: float) -> Intervention:
    """intervene_many given the sample's recorded original pass (so a sweep records it once)."""
    if not features:
        raise ValueError("intervene_many needs at least one (layer, position, latent) feature")
    cfg = clt.config
    x = rec.inputs.to(clt.b_dec.device, clt.b_dec.dtype) * clt.input_scale.to(clt.b_dec.dtype)[:, None, None]
    delta: dict[int, Tensor] = {}
    total = 0.0
    with torch.no_grad():
        for layer, position, feature in features:
            clt.check_feature(layer, feature)
            if not 0 <= position < len(rec.input_ids):
                raise ValueError(f"position {position} out of range: the prompt has {len(rec.input_ids)} tokens "
                                 f"(0..{len(rec.input_ids) - 1})")
            values, indices = clt.encode_layer(layer, x[layer, position][None])
            activation = float((values[0] * (indices[0] == feature)).sum())
            total += activation
            W = clt.W_dec[layer][feature].float() / clt.target_scale[layer : layer + cfg.n_targets(layer), None].float()
            for offset in range(len(W)):
                target = delta.setdefault(layer + offset, torch.zeros(len(rec.input_ids), W.shape[-1]))
                target[position] += (scale - 1) * activation * W[offset].cpu()

    def patch(l: int, mlp_out: Tensor, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
        return mlp_out + delta[l].to(mlp_out)

    model = loaded.model
    encoded = _encode_sample(loaded, sample)
    with torch.no_grad(), sites.patch_mlp_out(model, patch, layers=sorted(delta)):
        after = int(model(**encoded.model_inputs(model)).logits[0, -1].argmax())
    decode = loaded.processor.tokenizer.decode
    return Intervention(decode([int(rec.logits[-1].argmax())]).strip(), decode([after]).strip(), total)


def ranked_features(graph: AttributionGraph, logit: int = 0) -> list[tuple[int, int, int]]:
    """The graph's features as (layer, position, latent), most influential on the logit first."""
    order = feature_influence(graph, logit).argsort(descending=True)
    return [tuple(graph.features[i].tolist()) for i in order]


class AblationCurve(NamedTuple):
    """The answer as the graph's top-n features are ablated together, n = 1..len(answers)."""

    before: str  # the original answer token
    answers: list[str]  # answers[n - 1]: the answer with the top n features ablated
    first_flip: int | None  # smallest n whose ablation changes the answer (None: none up to the end)


def ablation_curve(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample, graph: AttributionGraph,
                   max_features: int = 32) -> AblationCurve:
    """Ablate the top 1, 2, ..., max_features features of the graph jointly in the real model.

    One feature rarely decides an answer on its own (the model is redundant); the curve shows how
    many of the graph's most influential features must go before the answer changes.
    """
    ranked = ranked_features(graph)[:max_features]
    if not ranked:
        raise ValueError("the graph has no feature nodes to ablate")
    check_compatible(clt, loaded.model)
    rec = record(loaded, clt, sample)
    results = [_intervene_recorded(loaded, clt, sample, rec, ranked[:n], 0.0) for n in range(1, len(ranked) + 1)]
    answers = [r.after for r in results]
    first = next((n for n, answer in enumerate(answers, 1) if answer != results[0].before), None)
    return AblationCurve(results[0].before, answers, first)


class FlipRate(NamedTuple):
    rate: float  # fraction of samples whose answer token changed when the top feature alone was ablated
    n: int  # samples evaluated
    first_flips: list[int | None]  # per sample: fewest top features whose joint ablation changes the answer

    def count_within(self, n_features: int) -> int:
        """Samples whose answer changes once their top n_features are ablated together."""
        return sum(f is not None and f <= n_features for f in self.first_flips)

    def within(self, n_features: int) -> float:
        """Fraction of samples whose answer changes once their top n_features are ablated together."""
        return self.count_within(n_features) / self.n


def ablation_flip_rate(loaded: LoadedModel, clt: CrossLayerTranscoder, samples: Sequence[data.Sample],
                       max_features: int = 16, **attribute_kwargs) -> FlipRate:
    """For each sample, ablate the graph's most influential features on the model's own answer token
    (the top one, then the top 2, ... up to max_features, jointly) and record when the answer first
    changes: a causal check that graph influence means something in the real model."""
    if not samples:
        raise ValueError("ablation_flip_rate needs at least one sample")
    first_flips: list[int | None] = []
    for sample in samples:
        graph = attribute(loaded, clt, sample, **attribute_kwargs)
        first_flips.append(ablation_curve(loaded, clt, sample, graph, max_features).first_flip if graph.n_features else None)
    return FlipRate(sum(f == 1 for f in first_flips) / len(samples), len(samples), first_flips)


# ------------------------------------------------------------------------------------- export


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node_json(graph: AttributionGraph, index: int, influence_score: float, labels: dict | None) -> dict:
    """One node in circuit-tracer's frontend format (graph_models.Node)."""
    kind = graph.node_kind(index)
    node = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "influence": influence_score, "activation": None}
    if kind == "feature":
        layer, pos, latent = graph.features[index].tolist()
        label = (labels or {}).get((layer, latent), "")
        node.update(node_id=f"{layer}_{latent}_{pos}", feature=_cantor(layer, latent), layer=str(layer), ctx_idx=pos,
                    feature_type="cross layer transcoder", jsNodeId=f"{layer}_{latent}-0", clerp=label,
                    activation=float(graph.activations[index]))
    elif kind == "error":
        layer, pos = divmod(index - graph.error_start, graph.n_positions)
        node.update(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                    feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}")
    elif kind == "embedding":
        pos = index - graph.embed_start
        vocab = int(graph.input_ids[pos])
        node.update(node_id=f"E_{vocab}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                    jsNodeId=f"E_{vocab}-{pos}", clerp=graph.node_label(index))
    else:
        j = index - graph.logit_start
        vocab, prob, layer = int(graph.logit_tokens[j]), float(graph.logit_probs[j]), str(graph.n_layers + 1)
        pos = graph.n_positions - 1
        node.update(node_id=f"{layer}_{vocab}_{pos}", feature=vocab, layer=layer, ctx_idx=pos, feature_type="logit",
                    jsNodeId=f"L_{vocab}-{pos}", token_prob=prob, is_target_logit=j == 0,
                    clerp=f'Output "{graph.logit_strings[j]}" (p={prob:.3f})')
    return node


def to_circuit_tracer_json(graph: AttributionGraph, slug: str = "clt-lite-graph", scan: str = "clt-lite",
                           node_threshold: float = 0.8, edge_threshold: float = 0.98,
                           labels: dict[tuple[int, int], str] | None = None) -> dict:
    """The pruned graph as circuit-tracer's frontend JSON: metadata, qParams, nodes, links.

    labels: optional {(layer, latent): text} shown as feature clerps.
    """
    pruned = prune(graph, node_threshold, edge_threshold)
    kept = pruned.node_mask.nonzero(as_tuple=True)[0].tolist()
    nodes = {i: _node_json(graph, i, float(pruned.cumulative[i]), labels) for i in kept}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [node for node in nodes.values() if node["node_id"] in linked or node["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.tokens,
                "prompt": graph.prompt, "node_threshold": node_threshold, "schema_version": 1}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": used, "links": links}


def export_json(graph: AttributionGraph, path: str | Path, **kwargs) -> dict:
    """Write to_circuit_tracer_json(graph, **kwargs) to `path` atomically; returns the dict written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = to_circuit_tracer_json(graph, slug=kwargs.pop("slug", path.stem), **kwargs)
    write_json(path, content, indent=None)
    return content
