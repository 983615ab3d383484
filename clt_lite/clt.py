"""The cross-layer transcoder (CLT): encode every layer's input, decode each target from all earlier sources.

Semantics (DESIGN.md §3). Layer l reads x_l (resid_mid by default, normalised by a per-layer
scalar). Its latents a_l write to the MLP outputs of layers l .. min(l+C-1, L-1), its own layer
included. The reconstruction of target t is the *sum* over sources s <= t < s+C of
W_dec[s->t]^T a_s, plus b_dec[t], plus an optional linear skip from x_t. A per-layer transcoder
(PLT) is the same model with C = 1.

Decoders are stored one parameter per source, W_dec[s] of shape [n, n_targets(s), d]: with C full
this is circuit-tracer's W_dec_l [n, L-l, d], so export is a rename plus scale folding.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .activations import batch_topk, compact, jump_relu
from .choices import Activation, DType, InputSite, check, names
from .devices import DTYPES
from .files import atomic_write
from .kernels import encoder_pre_acts, gather_rows, selected_pre_acts, sum_into_targets, topk_pre_acts
from .tensor_files import TensorDigest, check_names, open_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "clt.safetensors"
ACTIVATIONS = names(Activation)


@dataclass
class CLTConfig:
    """Shape and behaviour of a CrossLayerTranscoder (option names follow EleutherAI's sparsify)."""

    n_layers: int  # L: decoder layers; every layer is both a source (input) and a target (MLP output)
    d_model: int  # d: width of the input and target sites
    n_latents: int = 0  # latents per layer; 0 means expansion_factor * d_model (see num_latents)
    expansion_factor: int = 8  # latents per layer as a multiple of d_model, used when n_latents == 0
    k: int = 32  # active latents per token per layer (TopK exact, BatchTopK on average, JumpReLU initial L0)
    cross_layer: int = 0  # C: a layer-s latent writes to targets s..s+C-1; 0 or n_layers means all later layers
    activation: Activation = "topk"  # "topk", "batchtopk" (top B*k per layer over the batch, also at eval) or "jumprelu"
    jumprelu_bandwidth: float = 0.05  # JumpReLU: width of the straight-through kernel for the threshold gradient
    skip_connection: bool = False  # add a learned linear map from input t to target t (W_skip[t], zero init)
    post_encoder_scale: bool = False  # multiply each latent's activation by a per-latent scale (init 1)
    train_post_encoder: bool = True  # whether that post-encoder scale is trained (frozen at 1 when False)
    input_site: InputSite = "mlp_in"  # "mlp_in" (after the MLP's norm: the course's default on a VLM) or "resid_mid" (paper, circuit-tracer)
    dtype: DType = "float32"  # parameter dtype: "float32", "bfloat16" or "float16"

    def __post_init__(self) -> None:
        counts = ("n_layers", "d_model", "n_latents", "expansion_factor", "k", "cross_layer")
        wrong = [f"{name}={getattr(self, name)!r}" for name in counts if type(getattr(self, name)) is not int]
        if wrong:
            raise ValueError(f"CLTConfig sizes must be whole numbers, got {', '.join(wrong)}")
        if self.n_layers < 1 or self.d_model < 1:
            raise ValueError(f"n_layers and d_model must be >= 1, got {self.n_layers} and {self.d_model}")
        if self.n_latents < 0 or (self.n_latents == 0 and self.expansion_factor < 1):
            raise ValueError(
                f"set n_latents >= 1 or expansion_factor >= 1 (got {self.n_latents}, {self.expansion_factor})"
            )
        if not 1 <= self.k <= self.num_latents:
            raise ValueError(f"k={self.k} must be between 1 and the latents per layer ({self.num_latents}); lower k")
        if not 0 <= self.cross_layer <= self.n_layers:
            raise ValueError(
                f"cross_layer={self.cross_layer} must be in 0..{self.n_layers} (0 or n_layers = full, 1 = per-layer)"
            )
        check("activation", self.activation, Activation)
        check("input_site", self.input_site, InputSite)
        check("dtype", self.dtype, DType)
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")

    @property
    def num_latents(self) -> int:
        """Latents per layer, n, with n_latents = 0 resolved through expansion_factor."""
        return self.n_latents or self.expansion_factor * self.d_model

    @property
    def span(self) -> int:
        """C resolved: how many targets (own layer included) a latent writes to at most."""
        return self.n_layers if self.cross_layer == 0 else self.cross_layer

    def n_targets(self, source: int) -> int:
        """Targets written by the latents of `source`: layers source .. source + n_targets - 1."""
        return min(self.span, self.n_layers - source)

    @property
    def n_pairs(self) -> int:
        """Number of decoder matrices (source -> target pairs); L(L+1)/2 when full, L for a PLT."""
        return sum(self.n_targets(s) for s in range(self.n_layers))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: dict) -> CLTConfig:
        """Build from a dict (e.g. a saved config.json), rejecting unknown keys with one line."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLTConfig fields {sorted(unknown)}; the file was written by another version")
        return cls(**values)


class Encoding(NamedTuple):
    """Sparse latent activations: the kept latents of each token and layer, padded with zeros."""

    values: Tensor  # [B, L, k'] activations (0 in padding slots)
    indices: Tensor  # [B, L, k'] latent ids
    pre_acts: Tensor  # [B, L, n] encoder pre-activations (for the dead-latent loss and diagnostics)


class CLTOutput(NamedTuple):
    """Result of CrossLayerTranscoder.forward, all in normalised units."""

    reconstruction: Tensor  # [B, L, d] predicted MLP outputs
    values: Tensor  # [B, L, k'] kept latent activations
    indices: Tensor  # [B, L, k'] kept latent ids
    pre_acts: Tensor  # [B, L, n] encoder pre-activations
    l0: Tensor  # [L] mean active latents per token, per layer


class SourceDecoder(nn.Module):
    """One source layer's decoder, weight [n, n_targets, d]: a module of its own so that FSDP can shard each
    source as a unit and gather one at a time (clt_lite.parallel). Use it only through forward: under FSDP
    its weight is whole only there."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, values: Tensor | None, indices: Tensor, norms_only: bool = False) -> Tensor:
        """Contributions [N, n_targets * d] of latents (values, indices [N, k']) to every target, summed
        sparsely (embedding_bag gathers only the k' active rows); with norms_only, the decoder norms of
        those latents [N, k'] instead (the JumpReLU penalty's weights). Flat, not a view: FSDP's backward
        hook on a module's output would be lost by an in-place op on a view of it."""
        n, n_targets, d = self.weight.shape
        flat = self.weight.reshape(n, n_targets * d)
        if norms_only:
            return flat.norm(dim=1)[indices]
        return gather_rows(flat, indices, values.to(flat.dtype))


class CrossLayerTranscoder(nn.Module):
    """A CLT over all L layers (a PLT when cross_layer = 1). Computes in normalised units.

    Parameters: W_enc [L, n, d], b_enc [L, n], W_dec[s] [n, n_targets(s), d], b_dec [L, d], and when
    enabled W_skip [L, d, d] (x_t @ W_skip[t]), log_threshold [L, n] (JumpReLU), post_enc_scale [L, n].
    Buffers input_scale and target_scale [L] map raw activations to normalised ones (normalised = raw * scale).
    """

    def __init__(self, config: CLTConfig, device: torch.device | str | None = None,
                 on_decoder: Callable[[SourceDecoder], None] | None = None):
        """on_decoder(decoder) runs on each source's decoder as soon as it exists, before the next is built: FSDP
        shards it there (clt_lite.parallel.decoder_sharder), so no two decoders are ever whole on one device."""
        super().__init__()
        self.config = config
        self.trained_on: dict[str, str] = {}  # {"model": name, "fingerprint": LoadedModel.fingerprint()}; {} unknown
        L, d, n = config.n_layers, config.d_model, config.num_latents
        kw = dict(device=device, dtype=config.torch_dtype)
        # Paper initialisation (Ameisen et al. 2025): the encoder at ±1/sqrt(d) gives pre-activations of
        # order 1 on inputs with mean squared norm d; decoders small but non-zero at ±1/sqrt(L*d). Zero
        # decoders would give the encoder no gradient on the first TopK step, and a zero-init decoder
        # with JumpReLU makes the tanh penalty blind to which latents matter.
        self.W_enc = nn.Parameter(torch.empty(L, n, d, **kw).uniform_(-(d**-0.5), d**-0.5))
        self.b_enc = nn.Parameter(torch.zeros(L, n, **kw))
        dec_bound = (L * d) ** -0.5
        self.decoders = nn.ModuleList()
        for s in range(L):
            self.decoders.append(SourceDecoder(torch.empty(n, config.n_targets(s), d, **kw).uniform_(-dec_bound, dec_bound)))
            if on_decoder is not None:
                on_decoder(self.decoders[s])
        self.b_dec = nn.Parameter(torch.zeros(L, d, **kw))
        if config.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, d, d, **kw))
        if config.activation == "jumprelu":
            # Placeholder; initialize_from_batch sets it so that about k latents fire per token.
            self.log_threshold = nn.Parameter(torch.full((L, n), math.log(0.1), **kw))
        if config.post_encoder_scale:
            self.post_enc_scale = nn.Parameter(torch.ones(L, n, **kw), requires_grad=config.train_post_encoder)
        self.register_buffer("input_scale", torch.ones(L, device=device, dtype=torch.float32))
        self.register_buffer("target_scale", torch.ones(L, device=device, dtype=torch.float32))

    @property
    def W_dec(self) -> list[nn.Parameter]:
        """The decoders' weights by source: W_dec[s] [n, n_targets(s), d] (saved as "W_dec.{s}")."""
        return [decoder.weight for decoder in self.decoders]

    # ----------------------------------------------------------------------------------- encode
    def encode(self, x: Tensor) -> Encoding:
        """x [B, L, d] (normalised) -> the kept latents per token and layer."""
        cfg = self.config
        if cfg.activation == "jumprelu":  # the threshold's gradient needs every pre-activation near it
            pre = self._pre_acts(x).contiguous()  # FSDP2 hooks outputs that need a gradient; a view could lose its hook
            values, indices = compact(jump_relu(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth))
        else:  # select without gradient, then differentiate through the selected latents only
            with torch.no_grad():
                if cfg.activation == "topk":  # the top k of pre are those of relu(pre); the ReLU comes below
                    pre, indices = topk_pre_acts(x, self.W_enc, self.b_enc, cfg.k)
                else:
                    pre = self._pre_acts(x)
                    selected, indices = compact(batch_topk(pre.relu(), cfg.k))
                indices = indices.contiguous()
            values = self.pre_acts_at(x, pre, indices).relu()
            if cfg.activation == "batchtopk":  # compact's padding slots hold latents the batch did not select
                values = values * (selected > 0)
        if cfg.post_encoder_scale:
            values = values * self.post_enc_scale.expand(x.shape[0], -1, -1).gather(-1, indices)
        return Encoding(values, indices, pre)

    def _pre_acts(self, x: Tensor) -> Tensor:
        """x [B, L, d] -> W_enc x + b_enc [B, L, n] (kernels.encoder_pre_acts)."""
        return encoder_pre_acts(x, self.W_enc, self.b_enc)

    def pre_acts_at(self, x: Tensor, pre: Tensor, indices: Tensor) -> Tensor:
        """pre [B, L, n] (Encoding.pre_acts of x, no gradient) at `indices` [B, L, k'], differentiable in x and the
        encoder through those entries only (what TopK's gradient touches; AuxK uses it for the dead latents)."""
        return selected_pre_acts(x, self.W_enc, self.b_enc, pre, indices)

    def check_feature(self, layer: int, feature: int) -> None:
        """One-line errors for a layer or feature index this CLT does not have."""
        if not 0 <= layer < self.config.n_layers:
            raise ValueError(f"layer {layer} out of range: the CLT has layers 0..{self.config.n_layers - 1}")
        if not 0 <= feature < self.config.num_latents:
            raise ValueError(f"feature {feature} out of range: layer {layer} has features 0..{self.config.num_latents - 1}")

    def encode_layer(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """One layer's latents for x [N, d] (normalised): (values [N, k'], indices [N, k']).

        What the closed-loop replacement model needs: layer l's input only exists once the
        replacement has run layers < l. Same activation rules as encode.
        """
        cfg = self.config
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer].T + self.b_enc[layer]
        if cfg.activation == "topk":
            values, indices = pre.relu().topk(cfg.k, dim=-1, sorted=False)
        elif cfg.activation == "batchtopk":
            values, indices = compact(batch_topk(pre.relu()[:, None], cfg.k))
            values, indices = values[:, 0], indices[:, 0]
        else:
            dense = jump_relu(pre, self.log_threshold[layer].exp(), cfg.jumprelu_bandwidth)
            values, indices = compact(dense[:, None])
            values, indices = values[:, 0], indices[:, 0]
        if cfg.post_encoder_scale:
            values = values * self.post_enc_scale[layer][indices]
        return values, indices

    def decode_source(self, layer: int, values: Tensor, indices: Tensor) -> Tensor:
        """Contributions [N, n_targets(layer), d] of one source layer's latents to its targets (normalised, no bias)."""
        return self.decoders[layer](values, indices).unflatten(1, self.W_dec[layer].shape[1:])

    # ----------------------------------------------------------------------------------- decode
    def latent_sum(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sum of decoder contributions of the given latents per target, [B, L, d], sparse (no bias, no skip).

        Per source s, embedding_bag gathers only the k' active rows of W_dec[s] viewed as
        [n, n_targets*d] and sums them weighted by the activations: O(k d) per pair instead of O(n d).
        """
        # Through each module's forward: FSDP gathers one source at a time.
        parts = [decoder(v, i) for decoder, v, i in zip(self.decoders, values.unbind(1), indices.unbind(1))]
        return sum_into_targets(parts, self.config.n_layers, self.config.d_model)

    def latent_sum_dense(self, values: Tensor, indices: Tensor) -> Tensor:
        """Readable reference for latent_sum: scatter to dense [B, n] activations and contract with W_dec."""
        batch = values.shape[0]
        parts: list[list[Tensor]] = [[] for _ in range(self.config.n_layers)]
        for s, W in enumerate(self.W_dec):
            acts = torch.zeros(batch, W.shape[0], device=values.device, dtype=W.dtype)
            acts = acts.scatter_add(1, indices[:, s], values[:, s].to(W.dtype))
            for offset, part in enumerate(torch.einsum("bn,ntd->btd", acts, W).unbind(1)):
                parts[s + offset].append(part)
        return torch.stack([sum(p) for p in parts], dim=1)

    def decode(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruct all targets [B, L, d] from sparse latents (x is needed with skip_connection)."""
        return self._add_bias_and_skip(self.latent_sum(values, indices), x)

    def decode_dense(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """Same as decode through dense activations: slower, kept as the reference the tests compare to."""
        return self._add_bias_and_skip(self.latent_sum_dense(values, indices), x)

    def _add_bias_and_skip(self, out: Tensor, x: Tensor | None) -> Tensor:
        out = out + self.b_dec
        if self.config.skip_connection:
            if x is None:
                raise ValueError("this CLT has a skip connection: pass the inputs x to decode")
            out = out + torch.einsum("bld,lde->ble", x.to(self.W_skip.dtype), self.W_skip)
        return out

    def forward(self, x: Tensor) -> CLTOutput:
        """x [B, L, d] normalised inputs -> reconstruction of every target plus the sparse code."""
        enc = self.encode(x)
        recon = self.decode(enc.values, enc.indices, x)
        l0 = (enc.values > 0).sum(-1).float().mean(0)
        return CLTOutput(recon, enc.values, enc.indices, enc.pre_acts, l0)

    @torch.no_grad()
    def reconstruct_raw(self, raw_inputs: Tensor) -> Tensor:
        """Raw input-site activations [B, L, d] -> raw-scale MLP-output predictions [B, L, d]."""
        x = raw_inputs.to(self.b_dec.dtype) * self.input_scale.to(self.b_dec.dtype)[:, None]
        return self(x).reconstruction / self.target_scale.to(self.b_dec.dtype)[:, None]

    # ------------------------------------------------------------------------- training helpers
    def decoder_norms(self) -> Tensor:
        """[L, n] norm of each latent's decoder vectors concatenated over all the targets it writes."""
        return torch.stack([W.flatten(1).norm(dim=1) for W in self.W_dec])

    def sparsity_penalty(self, values: Tensor, indices: Tensor, c: float) -> Tensor:
        """Per-token tanh sparsity penalty [B]: sum over layers and latents of tanh(c * a * ||W_dec||).

        The paper's JumpReLU CLT penalty (Ameisen et al. 2025): weighting by the decoder norm stops the
        model from shrinking activations while growing decoders; tanh saturates so large activations
        are not pushed to zero (unlike L1).
        """
        norms = torch.stack([decoder(None, indices[:, s], norms_only=True) for s, decoder in enumerate(self.decoders)], 1)
        return torch.tanh(c * values * norms).sum((1, 2))

    @torch.no_grad()
    def initialize_from_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Data-dependent init from one normalised batch [B, L, d] of inputs and targets.

        b_dec[t] = mean target (the reconstruction starts at the mean, FVU ≈ 1 rather than ≫ 1);
        b_enc centres the pre-activations on the batch mean input so TopK selects by direction of
        deviation, not by the shared mean; JumpReLU thresholds are set so about k latents fire per token.
        """
        self.b_dec.copy_(targets.mean(0))
        mean_x = inputs.mean(0).to(self.W_enc.dtype)
        self.b_enc.copy_(-torch.einsum("lnd,ld->ln", self.W_enc, mean_x))
        if self.config.activation == "jumprelu":
            pre = self._pre_acts(inputs.to(self.W_enc.dtype))
            per_layer = pre.transpose(0, 1).reshape(self.config.n_layers, -1)
            kth = per_layer.topk(min(inputs.shape[0] * self.config.k, per_layer.shape[1]), dim=-1).values[:, -1]
            self.log_threshold.copy_(kth.clamp(min=1e-3).log()[:, None].expand_as(self.log_threshold))

    def set_scales(self, input_scale: Tensor, target_scale: Tensor) -> None:
        """Store the per-layer normalisation scalars (normalised = raw * scale) used by reconstruct_raw and export."""
        L = self.config.n_layers
        if input_scale.shape != (L,) or target_scale.shape != (L,):
            shapes = f"{tuple(input_scale.shape)} and {tuple(target_scale.shape)}"
            raise ValueError(f"scales must have shape [{L}], got {shapes}")
        self.input_scale.copy_(input_scale)
        self.target_scale.copy_(target_scale)

    # --------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write config.json and clt.safetensors (scales included) into folder `path`, each atomically; the weights
        file's metadata holds their sha256 (checked by load) and the model they were trained on (trained_on)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {_file_name(name): t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        digest = TensorDigest()
        for name in sorted(tensors):
            digest.update(name, tensors[name])
        metadata = {"sha256": digest.hexdigest(), "trained_on": json.dumps(self.trained_on)}
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write(path / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(self.config), indent=2)))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
             on_decoder: Callable[[SourceDecoder], None] | None = None) -> CrossLayerTranscoder:
        """Read a folder written by save(); one-line ValueError for missing, corrupt or mismatched files.

        Tensors are read one at a time (safetensors maps the file), each decoder handed to on_decoder as soon as
        it is loaded, as in the constructor: a sharded run never holds the whole CLT on one device or in RAM."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise ValueError(f"{config_path} not found; expected a folder written by CrossLayerTranscoder.save")
        try:
            config = CLTConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{config_path} is not a valid CLT config ({err}); re-save the model") from err
        with torch.device("meta"):
            model = cls(config)
        weights = path / WEIGHTS_FILE
        with open_safetensors(weights, "cpu") as tensors:  # read on the CPU: each tensor is hashed, then moved
            check_names(_expected_shapes(model), {k: tuple(tensors.get_slice(k).get_shape()) for k in tensors.keys()}, weights)
            metadata = tensors.metadata() or {}
            own, rest, digest = {_file_name(k): v for k, v in model.state_dict().items()}, {}, TensorDigest()
            for name in sorted(own):
                value = tensors.get_tensor(name)
                digest.update(name, value)
                value = value.to(map_location, own[name].dtype)
                if name.startswith("W_dec."):
                    decoder = model.decoders[int(name.removeprefix("W_dec."))]
                    decoder.weight = nn.Parameter(value)
                    if on_decoder is not None:
                        on_decoder(decoder)
                else:
                    rest[_module_name(name)] = value
            model.load_state_dict(rest, strict=False, assign=True)
        if "sha256" in metadata and metadata["sha256"] != digest.hexdigest():  # files from before checksums have none
            raise ValueError(f"{weights}: checksum mismatch (the weights changed after they were saved, e.g. a flipped "
                             "byte); re-train the CLT or restore the file")
        model.trained_on = json.loads(metadata.get("trained_on", "{}"))
        return model

    def check_model(self, loaded, allow_other: bool = False) -> None:
        """One-line ValueError when `loaded` (models.LoadedModel) is not the model this CLT was trained on, by weights
        fingerprint; allow_other=True (CLI: --allow-other-model) uses it anyway. CLTs of unknown origin pass."""
        if not self.trained_on or allow_other or loaded.fingerprint() == self.trained_on["fingerprint"]:
            return
        raise ValueError(f"this CLT was trained on {self.trained_on['model']} (weights {self.trained_on['fingerprint']}) "
                         f"but the model is {loaded.name} (weights {loaded.fingerprint()}); pass --allow-other-model "
                         "(allow_other=True) to use it anyway")


def _load_checked(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Check names and shapes against what the config implies (one line on mismatch), then load in place."""
    check_names(_expected_shapes(model), {k: tuple(v.shape) for k, v in tensors.items()}, source)
    own = {_file_name(k): v for k, v in model.state_dict().items()}
    model.load_state_dict({_module_name(k): v.to(own[k].dtype) for k, v in tensors.items()}, assign=True)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {_file_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


# Files keep the flat names ("W_dec.3") they had before the decoders became modules ("decoders.3.weight").
def _file_name(state_key: str) -> str:
    return re.sub(r"^decoders\.(\d+)\.weight$", r"W_dec.\1", state_key)


def _module_name(file_key: str) -> str:
    return re.sub(r"^W_dec\.(\d+)$", r"decoders.\1.weight", file_key)
