"""Interop with circuit-tracer: write a CLT in its on-disk layout (scales folded in), read such a folder back, and
write a LLaVA's language model on its own as a LlamaForCausalLM folder (what circuit-tracer can load).

circuit-tracer (github.com/safety-research/circuit-tracer) loads a cross-layer transcoder from one
W_enc_{l} and one W_dec_{l} safetensors file per layer plus a config.yaml naming the hook points it reads and
writes, in TransformerLens's names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from .clt import CLTConfig, CrossLayerTranscoder, _load_checked
from .files import atomic_write, write_json
from .tensor_files import read_safetensors

# circuit-tracer's hook names of our sites. mlp_in is `mlp.hook_in`, the MLP's input after the norm's weight:
# TransformerLens's `ln2.hook_normalized` is taken before that weight, and circuit-tracer's nnsight backend does not
# know it.
INPUT_HOOKS = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in"}
OUTPUT_HOOK = "hook_mlp_out"


class NotReadableByCircuitTracer(ValueError):
    """The CLT has a part circuit-tracer 0.5 would misread or drop, so exporting it for circuit-tracer is refused."""


def unreadable_parts(config: CLTConfig) -> list[str]:
    """What circuit-tracer 0.5 cannot read in a CLT of this config (empty: it loads exactly).

    It has no TopK (a file without thresholds loads as a ReLU transcoder, with tens of times more active
    features) and its loader never reads W_skip.
    """
    parts = []
    if config.activation != "jumprelu":
        parts.append(f"{config.activation} activation (circuit-tracer runs JumpReLU or ReLU only; a TopK file loads "
                     "as ReLU)")
    if config.skip_connection:
        parts.append("skip connection (circuit-tracer's loader ignores W_skip)")
    return parts


@torch.no_grad()
def export(clt: CrossLayerTranscoder, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
           allow_unreadable: bool = False) -> None:
    """Write circuit-tracer's CLT layout with the scales folded in, so the files act on raw activations.

    Per layer l: W_enc_{l}.safetensors (W_enc_l [n, d], b_enc_l [n], b_dec_l [d], threshold_l [n] for
    JumpReLU, W_skip_l [d, d] with a skip) and W_dec_{l}.safetensors (W_dec_l [n, L-l, d]; targets past
    l+C-1 are zero so partial cross_layer still loads there). Folding: W_enc' = W_enc * s_in[l],
    W_dec'[s->t] = W_dec[s->t] / s_out[t], b_dec'[t] = b_dec[t] / s_out[t], W_skip'[t] = W_skip[t] * s_in[t] / s_out[t].
    A JumpReLU's post-encoder scale p > 0 goes into the encoder (W_enc, b_enc and the threshold times p: the same
    latents fire, with the same activation values as ours); under TopK it goes into the decoder (the top-k choice
    is made before the scale).

    circuit-tracer reads JumpReLU CLTs without a skip exactly; anything else is refused with
    NotReadableByCircuitTracer unless allow_unreadable (then only `load` here reads the folder right: the
    activation and k are recorded under `clt_lite` in config.yaml).
    """
    cfg = clt.config
    unreadable = unreadable_parts(cfg)
    if unreadable and not allow_unreadable:
        raise NotReadableByCircuitTracer(
            f"circuit-tracer 0.5 cannot read this CLT's {' and '.join(unreadable)}; train with --activation jumprelu "
            "and no skip connection for circuit-tracer, or pass allow_unreadable=True for a folder only clt_lite reads")
    post = clt.post_enc_scale.float() if cfg.post_encoder_scale else None
    into_encoder = post is not None and cfg.activation == "jumprelu"
    if into_encoder and not bool((post > 0).all()):
        raise NotReadableByCircuitTracer("a JumpReLU's post-encoder scale must be > 0 to fold into the encoder; "
                                         f"{int((post <= 0).sum())} latents have a scale <= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or cfg.torch_dtype
    s_in, s_out = clt.input_scale.float(), clt.target_scale.float()
    L, n, d = cfg.n_layers, cfg.num_latents, cfg.d_model
    for s in range(L):
        gain = post[s] if into_encoder else torch.ones(n, device=s_in.device)
        enc = {
            f"W_enc_{s}": clt.W_enc[s].float() * s_in[s] * gain[:, None],
            f"b_enc_{s}": clt.b_enc[s].float() * gain,
            f"b_dec_{s}": clt.b_dec[s].float() / s_out[s],
        }
        if cfg.activation == "jumprelu":
            enc[f"threshold_{s}"] = clt.log_threshold[s].float().exp() * gain
        if cfg.skip_connection:
            enc[f"W_skip_{s}"] = clt.W_skip[s].float() * s_in[s] / s_out[s]
        W = clt.W_dec[s].float()
        if post is not None and not into_encoder:
            W = W * post[s][:, None, None]
        padded = torch.zeros(n, L - s, d, device=W.device)
        padded[:, : W.shape[1]] = W / s_out[s : s + W.shape[1], None]
        _save_cpu(out / f"W_enc_{s}.safetensors", enc, dtype)
        _save_cpu(out / f"W_dec_{s}.safetensors", {f"W_dec_{s}": padded}, dtype)
    meta = asdict(replace(cfg, post_encoder_scale=False, dtype=str(dtype).removeprefix("torch.")))
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": INPUT_HOOKS[cfg.input_site],
        "feature_output_hook": OUTPUT_HOOK,
        "clt_lite": meta,
    }
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))


def _save_cpu(path: Path, tensors: dict[str, Tensor], dtype: torch.dtype) -> None:
    cpu = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp)))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read circuit-tracer's CLT layout back into a CrossLayerTranscoder acting on raw activations (scales = 1).

    Folders written by `export` carry their config under `clt_lite`; other JumpReLU CLTs
    in the same layout are read as full cross-layer JumpReLU models.
    """
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found; expected a folder in circuit-tracer's CLT layout")
    meta = (yaml.safe_load(config_path.read_text()) or {}).get("clt_lite")
    enc0 = read_safetensors(path / "W_enc_0.safetensors", map_location)
    if meta is None:
        if "threshold_0" not in enc0:
            raise ValueError(
                f"{path} has no clt_lite metadata and no thresholds; only JumpReLU CLTs can be read without it"
            )
        n, d = enc0["W_enc_0"].shape
        n_layers = len(list(path.glob("W_enc_*.safetensors")))
        meta = dict(n_layers=n_layers, d_model=d, n_latents=n, k=min(32, n), activation="jumprelu")
    config = CLTConfig.from_dict(meta)
    with torch.device("meta"):
        model = CrossLayerTranscoder(config)
    # file tensor name -> our state_dict name, for the tensors this config needs
    names = {"W_enc": "W_enc", "b_enc": "b_enc", "b_dec": "b_dec"}
    if config.activation == "jumprelu":
        names["threshold"] = "log_threshold"
    if config.skip_connection:
        names["W_skip"] = "W_skip"
    per_layer: dict[str, list[Tensor]] = {name: [] for name in names}
    state: dict[str, Tensor] = {"input_scale": torch.ones(config.n_layers), "target_scale": torch.ones(config.n_layers)}
    for s in range(config.n_layers):
        enc_path = path / f"W_enc_{s}.safetensors"
        enc = enc0 if s == 0 else read_safetensors(enc_path, map_location)
        dec_path = path / f"W_dec_{s}.safetensors"
        dec = read_safetensors(dec_path, map_location)
        for name, found in [(f"{n}_{s}", enc) for n in names] + [(f"W_dec_{s}", dec)]:
            if name not in found:
                raise ValueError(f"{enc_path if found is enc else dec_path} has no tensor {name}; re-export the CLT")
        for name in names:
            per_layer[name].append(enc[f"{name}_{s}"])
        state[f"W_dec.{s}"] = dec[f"W_dec_{s}"][:, : config.n_targets(s)]
    for name, ours in names.items():
        state[ours] = torch.stack(per_layer[name])
    if "log_threshold" in state:
        state["log_threshold"] = state["log_threshold"].float().log()
    _load_checked(model, state, path)
    return model.to(map_location)


def export_language_model(loaded, out_dir: str | os.PathLike) -> Path:
    """Write the language model of a loaded LLaVA as a text-only LlamaForCausalLM folder (weights + tokenizer).

    Same weights, so on a text-only prompt it computes what the LLaVA computes. For transformers 4.x (circuit-tracer's
    pin) the config also carries `rope_theta` at top level, and the tokenizer config names PreTrainedTokenizerFast
    and keeps only the fields both versions read (5.x writes a class name and fields 4.x does not know).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    text_config = loaded.model.config.text_config.to_dict()
    config = LlamaConfig(**{k: v for k, v in text_config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    source = loaded.model
    state = {f"model.{k}": v for k, v in source.model.language_model.state_dict().items()}
    state["lm_head.weight"] = source.get_output_embeddings().weight
    llama.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, strict=True, assign=True)
    out = Path(out_dir)
    llama.save_pretrained(out)
    loaded.processor.tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    write_json(out / "config.json", config)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    portable = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "padding_side")
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                               **{k: tokenizer_config[k] for k in portable if k in tokenizer_config}})
    return out
