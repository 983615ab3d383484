"""The local replacement model of one prompt: the real pass recorded, its nonlinearities frozen, CLT features as leaves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data, sites
from ..choices import Convention, check
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from ..replacement import check_compatible

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


@torch.no_grad()
def record(loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample) -> Recorded:
    """Run the real model once on the sample's prompt and keep what the local replacement needs.

    Images of another size are accepted: the processor resizes and centre-crops them to the
    vision tower's input, as LLaVA does with any photo.
    """
    model = loaded.model
    encoded = data.encode_batch(loaded.processor, [sample])  # a sample without an image is a text-only prompt
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

# How a graph treats what no node explains. "circuit-tracer" (the default, as circuit-tracer 0.5 and the paper do):
# features and errors at position 0 (BOS) are zeroed and the decoder bias b_dec stays outside the error nodes, both
# left as an uncredited constant; a cap on feature nodes keeps the most influential features and drops the rest.
# "clt-lite" (this course's earlier rule, kept because it makes every identity exact without a constant): BOS keeps
# its features and errors, errors absorb b_dec, and a cap keeps the features of largest activation x decoder norm and
# folds the rest into the error nodes.


@torch.no_grad()
def encode_recorded(clt: CrossLayerTranscoder, rec: Recorded):
    """The CLT's latents at every position of a recorded pass (values and indices [S, L, k']). Everything that reads
    a prompt's feature activations goes through here, so the graph, interventions and labels agree to the last bit
    (in bfloat16, normalising before or after the cast moves activations near zero across it)."""
    x = (rec.inputs * clt.input_scale.float()[:, None, None].cpu()).transpose(0, 1)  # [S, L, d]
    return clt.encode(x.to(clt.b_dec.device, clt.b_dec.dtype))


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
    Under the "circuit-tracer" convention a constant (b_dec, and every MLP output at BOS) is added at mlp_out too,
    credited to no node. `run` scales each source by a coefficient (1 = the real pass); that is also how linear
    interventions on the frozen model are made.

    max_feature_nodes: under "clt-lite" the cap applied here (the rest folded into errors); under
        "circuit-tracer" every active feature is kept here and `attribute` applies the cap by influence.
    """

    def __init__(self, loaded: LoadedModel, clt: CrossLayerTranscoder, sample: data.Sample,
                 max_feature_nodes: int = 4096, convention: Convention = "circuit-tracer"):
        if max_feature_nodes < 1:
            raise ValueError(f"max_feature_nodes must be >= 1, got {max_feature_nodes}")
        check("convention", convention, Convention)
        check_compatible(clt, loaded.model)
        self.convention = convention
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
        self._select_features(max_feature_nodes if convention == "clt-lite" else None)

    # -------------------------------------------------------------------------------- features
    @torch.no_grad()
    def _select_features(self, cap: int | None) -> None:
        """Active features from the recorded inputs (none at BOS under "circuit-tracer"); keep at most `cap` (None: all),
        ranked by activation x raw decoder norm.

        Dropped features' writes stay in the error terms, so every identity still holds exactly.
        """
        clt, rec = self.clt, self.recorded
        enc = encode_recorded(clt, rec)
        values, indices = enc.values.float().cpu(), enc.indices.cpu()  # [S, L, k']
        active = values > 0
        if self.convention == "circuit-tracer":
            active[0] = False  # BOS
        pos, layer, slot = active.nonzero(as_tuple=True)
        latent = indices[pos, layer, slot]
        acts = values[pos, layer, slot]
        self.n_active_features = len(acts)
        keep = torch.arange(len(acts))
        if cap is not None and cap < len(acts):
            keep = (acts * self._raw_decoder_norms(layer, latent)).topk(cap).indices
        n, S = clt.config.num_latents, len(rec.input_ids)
        keep = keep[torch.argsort((layer[keep] * S + pos[keep]) * n + latent[keep])]  # (layer, position, latent) order
        self.features = torch.stack([layer[keep], pos[keep], latent[keep]], dim=1)  # [n_f, 3] sorted
        self.activations = acts[keep]
        self.pre_acts = enc.pre_acts.float().cpu()[pos[keep], layer[keep], latent[keep]]
        self.write_vectors = self._write_vectors()
        writes = self._feature_writes(torch.ones(len(keep)))
        skip = torch.stack([self._skip(t, rec.inputs[t].to(self.device)) for t in range(len(self.blocks))])
        self.errors = rec.mlp_out.to(self.device) - writes - skip  # [L, S, d]: absorbs b_dec and dropped features
        self.constant = torch.zeros_like(self.errors)  # [L, S, d] what no node is credited with
        if self.convention == "circuit-tracer":
            b_dec = (clt.b_dec.detach().float() / clt.target_scale.float()[:, None]).to(self.device)
            self.errors = self.errors - b_dec[:, None]
            self.errors[:, 0] = 0
            self.constant = rec.mlp_out.to(self.device) - writes - skip - self.errors

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
        """Frozen model on embeds [..., S, d] with MLP outputs writes[l] [..., S, d] plus the constant and the CLT's skip.

        Returns the CLT input site of every layer ([..., S, d] each) and the final normed residual.
        """
        fz, h, inputs = self.frozen, embeds, []
        with torch.no_grad():  # each norm's frozen 1/rms times its weight, [S, d]: one product per norm in the graph
            attn_scales = [fz.attn_rsqrt[l] * block.input_layernorm.weight.float() for l, block in enumerate(self.blocks)]
            mlp_scales = [fz.mlp_rsqrt[l] * block.post_attention_layernorm.weight.float() for l, block in enumerate(self.blocks)]
        for l, block in enumerate(self.blocks):
            h = h + self._attend(block.self_attn, h * attn_scales[l], fz.patterns[l])
            x = h if self.clt.config.input_site == "resid_mid" else h * mlp_scales[l]
            inputs.append(x)
            h = h + writes[l] + self.constant[l]
            if self.clt.config.skip_connection:
                h = h + self._skip(l, x)
        return inputs, h * (fz.final_rsqrt * self.lm.norm.weight.float())

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
