#!/usr/bin/env python
"""circuit-tracer side of the clt_lite <-> circuit-tracer interop check.

Run ONLY with the separate circuit-tracer venv (transformers 4.x, nnsight, transformer-lens):

    /tmp/ctvenv/bin/python interop/circuit_tracer_side.py \
        --model /tmp/interop/model --clt /tmp/interop/ct_clt \
        --prompt "USER: what color is the circle? ASSISTANT:" --out /tmp/interop/ct_out \
        [--backend transformerlens|nnsight|both] [--max-n-logits 10] \
        [--desired-logit-prob 0.95] [--max-feature-nodes N] [--batch-size 256]

This file must not import clt_lite (or anything needing transformers 5).

For each backend it
  1. loads the local Llama folder + the CLT (circuit-tracer safetensors layout) into a
     circuit-tracer ReplacementModel (float32, CPU);
  2. checks the loaded model's logits against the plain HF model (max abs diff);
  3. caches the CLT inputs (mlp.hook_in) and MLP outputs (hook_mlp_out) at every layer and
     computes circuit-tracer's CLT reconstruction -> OUT/<backend>/recon.safetensors;
  4. runs circuit_tracer.attribute(...) -> OUT/<backend>/graph.safetensors and scores.json;
  5. prints one JSON summary line (also written to OUT/summary.json).

Tokenization: the prompt is tokenized once with the HF tokenizer and
add_special_tokens=True (BOS id first) and the *token ids* are passed to every backend and to
attribute(). circuit-tracer's own string path uses add_special_tokens=False and then prepends a
special token only if the first token is not already special -- and <unk> counts as special,
so a prompt starting with an unknown word would get no BOS there. Passing ids avoids that.

Development helper: ``--make-dev-clt`` writes a random JumpReLU CLT in circuit-tracer's layout
to --clt (thresholds calibrated on the prompt so that ~--dev-target-l0 features fire per token
and layer) and then continues with the normal run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import sys
import time
import traceback

import torch
from safetensors.torch import save_file

FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "hook_mlp_out"
DEVICE = torch.device("cpu")
DTYPE = torch.float32


# --------------------------------------------------------------------------------------------
# HF reference model / tokenization
# --------------------------------------------------------------------------------------------


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPE, attn_implementation="eager"
    ).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf, tok


def tokenize(tok, prompt: str) -> torch.Tensor:
    ids = tok(prompt, add_special_tokens=True, return_tensors="pt").input_ids[0]
    if tok.bos_token_id is not None and int(ids[0]) != tok.bos_token_id:
        ids = torch.cat([torch.tensor([tok.bos_token_id]), ids])
    return ids


def rope_theta_of(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    rp = getattr(hf_config, "rope_parameters", None) or {}
    rs = getattr(hf_config, "rope_scaling", None) or {}
    if theta is None:
        theta = rp.get("rope_theta", 10000.0)
    rtype = rs.get("rope_type", rs.get("type", rp.get("rope_type", "default")))
    if rtype not in (None, "default"):
        raise ValueError(f"rope scaling {rtype!r} is not supported by this interop script")
    return float(theta)


# --------------------------------------------------------------------------------------------
# CLT
# --------------------------------------------------------------------------------------------


def load_ct_clt(clt_dir: str):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    cfg_path = os.path.join(clt_dir, "config.yaml")
    if os.path.exists(cfg_path):
        import yaml

        with open(cfg_path) as f:
            ycfg = yaml.safe_load(f) or {}
        for key, want in (
            ("feature_input_hook", FEATURE_INPUT_HOOK),
            ("feature_output_hook", FEATURE_OUTPUT_HOOK),
        ):
            if key in ycfg and ycfg[key] != want:
                print(f"WARNING: {cfg_path} has {key}={ycfg[key]!r}, using {want!r}", file=sys.stderr)
    return load_clt(
        clt_dir,
        feature_input_hook=FEATURE_INPUT_HOOK,
        feature_output_hook=FEATURE_OUTPUT_HOOK,
        dtype=DTYPE,
        device=DEVICE,
        lazy_decoder=False,
    )


@torch.no_grad()
def hf_mlp_inputs(hf, ids: torch.Tensor) -> torch.Tensor:
    """[L, S, d] outputs of post_attention_layernorm (= TL mlp.hook_in) from the HF model."""
    acts = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda m, i, o: acts.append(o[0].detach().clone())
        )
        for layer in hf.model.layers
    ]
    try:
        hf(ids[None])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(acts)


@torch.no_grad()
def make_dev_clt(out_dir: str, hf, ids: torch.Tensor, n_latents: int, target_l0: float, seed: int):
    """Random JumpReLU CLT in circuit-tracer's safetensors layout (via CrossLayerTranscoder)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    cfg = hf.config
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(
        L,
        n_latents,
        d,
        activation_function="jump_relu",
        lazy_decoder=False,
        feature_input_hook=FEATURE_INPUT_HOOK,
        feature_output_hook=FEATURE_OUTPUT_HOOK,
        device=DEVICE,
        dtype=DTYPE,
    )
    W_enc = torch.randn(L, n_latents, d, generator=g) / math.sqrt(d)
    b_enc = 0.1 * torch.randn(L, n_latents, generator=g)
    clt.W_enc.copy_(W_enc)
    clt.b_enc.copy_(b_enc)
    clt.b_dec.copy_(0.01 * torch.randn(L, d, generator=g))
    for l in range(L):
        clt.W_dec[l].copy_(torch.randn(n_latents, L - l, d, generator=g) * (0.1 / math.sqrt(d * (l + 1))))
    # thresholds: per layer, the quantile of the pre-activations (positions >= 1) that leaves
    # ~target_l0 features firing per token; jittered per feature, always positive.
    x = hf_mlp_inputs(hf, ids)  # [L, S, d]
    pre = torch.einsum("lsd,lfd->lsf", x, W_enc) + b_enc[:, None]
    q = 1.0 - target_l0 / n_latents
    for l in range(L):
        t = torch.quantile(pre[l, 1:].flatten(), q).clamp_min(0.05)
        jitter = 1.0 + 0.05 * torch.randn(n_latents, generator=g)
        clt.activation_function.threshold[l, 0].copy_((t * jitter).clamp_min(0.01))
    clt.to_safetensors(out_dir)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(
            "model_kind: cross_layer_transcoder\n"
            f"feature_input_hook: {FEATURE_INPUT_HOOK}\n"
            f"feature_output_hook: {FEATURE_OUTPUT_HOOK}\n"
            "# random development CLT written by interop/circuit_tracer_side.py --make-dev-clt\n"
        )
    print(f"wrote random dev CLT to {out_dir} (L={L}, n={n_latents}, d={d})", file=sys.stderr)


@torch.no_grad()
def dense_reference_reconstruction(clt, acts: torch.Tensor) -> torch.Tensor:
    """Independent dense decode: recon[j] = b_dec[j] + sum_{i<=j} acts[i] @ W_dec_i[:, j-i]."""
    L = clt.n_layers
    out = clt.b_dec[:, None, :].expand(L, acts.shape[1], clt.d_model).clone()
    for i in range(L):
        Wd = clt._get_decoder_vectors(i)  # [n, L-i, d]
        out[i:] += torch.einsum("sf,fkd->ksd", acts[i], Wd)
    if clt.W_skip is not None:
        raise NotImplementedError("skip connections not handled in the dense reference")
    return out


@torch.no_grad()
def reconstructions(clt, inputs: torch.Tensor, mlp_out: torch.Tensor, zero_positions: slice):
    """circuit-tracer's reconstruction of mlp_out from inputs (both [L, S, d])."""
    acts_dense = clt.encode(inputs).float()  # [L, S, n], JumpReLU applied, no position zeroing
    dense_ref = dense_reference_reconstruction(clt, acts_dense)
    try:
        recon = clt.forward(inputs)  # encode -> sparse -> decode (circuit-tracer's forward)
        forward_ok = tuple(recon.shape) == tuple(mlp_out.shape)
    except Exception:  # noqa: BLE001
        recon, forward_ok = None, False
    if not forward_ok:
        # compute_reconstruction infers n_pos from the last position that has an active
        # feature; fall back to the dense decode if that truncated the result.
        print("WARNING: clt.forward shape mismatch; using dense decode", file=sys.stderr)
        recon = dense_ref
    # What attribution uses: features at zero_positions (BOS) removed; their contribution is
    # pushed into the error node, and errors at zero_positions are then zeroed.
    comps = clt.compute_attribution_components(inputs, zero_positions=zero_positions)
    recon_attr = comps["reconstruction"]
    if recon_attr.shape != mlp_out.shape:
        acts_z = acts_dense.clone()
        acts_z[:, zero_positions] = 0
        recon_attr = dense_reference_reconstruction(clt, acts_z)
    err = mlp_out - recon
    stats = {
        "forward_vs_dense_decode_maxdiff": float((recon - dense_ref).abs().max()),
        "fvu": float(err.pow(2).sum() / (mlp_out - mlp_out.mean(1, keepdim=True)).pow(2).sum()),
        "fvu_excl_pos0": float(
            err[:, 1:].pow(2).sum()
            / (mlp_out[:, 1:] - mlp_out[:, 1:].mean(1, keepdim=True)).pow(2).sum()
        ),
        "l0_per_token_per_layer": float((acts_dense > 0).float().sum(-1).mean()),
        "l0_per_token_per_layer_excl_pos0": float((acts_dense[:, 1:] > 0).float().sum(-1).mean()),
        "n_active_excl_pos0": int((acts_dense[:, 1:] > 0).sum()),
    }
    return {
        "inputs": inputs.float(),
        "mlp_out": mlp_out.float(),
        "reconstruction": recon.float(),
        "reconstruction_attribution": recon_attr.float(),
        "activations_dense": acts_dense,
    }, stats


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def build_tl_config(model_dir: str, hf_config):
    from transformer_lens import HookedTransformerConfig

    assert hf_config.architectures[0] == "LlamaForCausalLM", hf_config.architectures
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    assert not getattr(hf_config, "attention_bias", False), "attention_bias not supported"
    assert not getattr(hf_config, "mlp_bias", False), "mlp_bias not supported"
    return HookedTransformerConfig(
        model_name=os.path.abspath(model_dir),  # circuit-tracer only checks it for "gemma-3"
        original_architecture="LlamaForCausalLM",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        # TL uses grouped-query attention only when n_key_value_heads is not None
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.max_position_embeddings,
        act_fn=hf_config.hidden_act,
        eps=hf_config.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        rotary_base=rope_theta_of(hf_config),
        tokenizer_prepends_bos=True,
        default_prepend_bos=True,
        device=str(DEVICE),
        dtype=DTYPE,
    )


def load_transformerlens(model_dir: str, hf, tok, clt):
    """TransformerLens backend for a local Llama folder of arbitrary size.

    HookedTransformer.from_pretrained (and hence circuit-tracer's
    TransformerLensReplacementModel.from_pretrained_and_transcoders) insists on an official
    model name (get_official_model_name raises for a local path). We therefore do exactly what
    from_pretrained_and_transcoders does, minus the name lookup:
        cls(cfg, tokenizer) -> load_and_process_state_dict(convert_llama_weights(hf, cfg),
        fold_ln=False, center_writing_weights=False, center_unembed=False)
        -> _configure_replacement_model(clt)
    with a HookedTransformerConfig built from the HF config. (Patching the name check instead
    would route through TL's convert_hf_model_config, whose LlamaForCausalLM branch does not
    read rope_theta, i.e. it would silently use rotary_base=10000.)
    """
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    cfg = build_tl_config(model_dir, hf.config)
    model = TransformerLensReplacementModel(cfg, tokenizer=tok, move_to_device=True)
    state_dict = convert_llama_weights(hf, cfg)
    state_dict = {k: v.detach().clone().to(DTYPE) for k, v in state_dict.items()}
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model._configure_replacement_model(clt)  # same call from_pretrained_and_transcoders makes
    model.eval()
    return model


def load_nnsight(model_dir: str, clt):
    """nnsight backend: a local folder path works as model_name (AutoConfig/AutoModel/
    AutoTokenizer.from_pretrained all take local paths)."""
    from circuit_tracer import ReplacementModel

    return ReplacementModel.from_pretrained_and_transcoders(
        model_name=model_dir,
        transcoders=clt,
        backend="nnsight",
        device=DEVICE,
        dtype=DTYPE,
    )


@torch.no_grad()
def cache_transformerlens(model, ids: torch.Tensor):
    L = model.cfg.n_layers
    in_names = [f"blocks.{l}.{FEATURE_INPUT_HOOK}" for l in range(L)]
    out_names = [f"blocks.{l}.{FEATURE_OUTPUT_HOOK}" for l in range(L)]
    wanted = set(in_names + out_names)
    logits, cache = model.run_with_cache(ids[None], names_filter=lambda n: n in wanted)
    inputs = torch.stack([cache[n][0] for n in in_names])
    mlp_out = torch.stack([cache[n][0] for n in out_names])
    return logits[0].float(), inputs, mlp_out


@torch.no_grad()
def cache_nnsight(model, ids: torch.Tensor):
    """Same hook locations setup_attribution uses (nnsight mapping for LlamaForCausalLM:
    mlp.hook_in = post_attention_layernorm.output, hook_mlp_out = mlp.output)."""
    from nnsight import save

    with model.trace(ids):
        ins, outs = [], []
        for l in range(model.cfg.n_layers):
            ins.append(model.get_feature_input_loc(l).output)
            y = model.get_feature_output_loc(l).output
            if y.ndim == 2:
                y = y.unsqueeze(0)
            outs.append(y)
        inputs = save(torch.cat(ins, dim=0))
        mlp_out = save(torch.cat(outs, dim=0))
        logits = save(model.output.logits)
    return logits[0].float(), inputs.float(), mlp_out.float()


# --------------------------------------------------------------------------------------------
# Main per-backend run
# --------------------------------------------------------------------------------------------


def run_backend(backend: str, args, hf, tok, ids, ref_logits, clt) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    out_dir = os.path.join(args.out, backend)
    os.makedirs(out_dir, exist_ok=True)
    summary: dict = {"backend": backend, "loaded": False}
    t0 = time.time()

    # 1. load
    if backend == "transformerlens":
        model = load_transformerlens(args.model, hf, tok, clt)
        cache_fn = cache_transformerlens
    elif backend == "nnsight":
        model = load_nnsight(args.model, clt)
        cache_fn = cache_nnsight
    else:
        raise ValueError(backend)
    summary["loaded"] = True
    summary["load_s"] = round(time.time() - t0, 2)

    # tokenization as circuit-tracer sees our ids (must be unchanged: BOS already first)
    ct_ids = model.ensure_tokenized(ids)
    assert torch.equal(ct_ids.cpu(), ids), (ct_ids, ids)

    # 2. logits + 3. caches
    logits, inputs, mlp_out = cache_fn(model, ids)
    diff = (logits - ref_logits).abs()
    logit_match = {
        "logits_max_abs_diff": float(diff.max()),
        "logits_max_abs_diff_last_pos": float(diff[-1].max()),
        "argmax_agree_frac": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "ref_logits_abs_max": float(ref_logits.abs().max()),
    }
    summary.update(logit_match)
    # also compare the CLT inputs with a plain-HF hook (independent of the backend)
    hf_inputs = hf_mlp_inputs(hf, ids)
    summary["mlp_in_vs_hf_max_abs_diff"] = float((inputs - hf_inputs).abs().max())

    recon, rstats = reconstructions(clt, inputs, mlp_out, model.zero_positions)
    save_file({k: v.contiguous() for k, v in recon.items()}, os.path.join(out_dir, "recon.safetensors"))
    summary["recon"] = rstats

    # 4. attribution
    t1 = time.time()
    graph = attribute(
        ids,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        verbose=args.verbose,
    )
    summary["attribution_s"] = round(time.time() - t1, 2)

    logit_ids = graph.logit_token_ids.cpu()
    tensors = {
        "adjacency_matrix": graph.adjacency_matrix.float().cpu(),
        "active_features": graph.active_features.long().cpu(),
        "selected_features": graph.selected_features.long().cpu(),
        "activation_values": graph.activation_values.float().cpu(),
        "logit_targets": logit_ids.long(),
        "logit_probabilities": graph.logit_probabilities.float().cpu(),
        "input_tokens": graph.input_tokens.long().cpu(),
    }
    n_pos = len(graph.input_tokens)
    L = graph.cfg.n_layers
    layout = {
        "order": "[selected features, errors (layer-major: layer*n_pos+pos), tokens, logits]",
        "rows_are": "targets",
        "cols_are": "sources",
        "n_selected_features": int(len(graph.selected_features)),
        "n_error_nodes": int(L * n_pos),
        "n_token_nodes": int(n_pos),
        "n_logit_nodes": int(len(logit_ids)),
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(out_dir, "graph.safetensors"),
        metadata={k: str(v) for k, v in layout.items()},
    )
    replacement, completeness = compute_graph_scores(graph)

    n_nodes = int(graph.adjacency_matrix.shape[0])
    scores = {
        "backend": backend,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "logit_match": logit_match,
        "mlp_in_vs_hf_max_abs_diff": summary["mlp_in_vs_hf_max_abs_diff"],
        "recon": rstats,
        "n_active_features": int(graph.active_features.shape[0]),
        "n_nodes": n_nodes,
        "layout": layout,
        "input_tokens": graph.input_tokens.tolist(),
        "input_token_strs": tok.convert_ids_to_tokens(graph.input_tokens.tolist()),
        "logit_targets": logit_ids.tolist(),
        "logit_target_strs": [t.token_str for t in graph.logit_targets],
        "logit_probabilities": graph.logit_probabilities.tolist(),
        "zero_positions": [model.zero_positions.start, model.zero_positions.stop],
        "params": {
            "max_n_logits": args.max_n_logits,
            "desired_logit_prob": args.desired_logit_prob,
            "max_feature_nodes": args.max_feature_nodes,
            "batch_size": args.batch_size,
        },
    }
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(scores, f, indent=1)

    summary.update(
        {
            "n_active_features": scores["n_active_features"],
            "n_selected_features": layout["n_selected_features"],
            "n_nodes": n_nodes,
            "n_logits": layout["n_logit_nodes"],
            "replacement_score": replacement,
            "completeness_score": completeness,
        }
    )
    del model
    return summary


def compare_backends(out: str) -> dict:
    from safetensors.torch import load_file

    a = load_file(os.path.join(out, "transformerlens", "graph.safetensors"))
    b = load_file(os.path.join(out, "nnsight", "graph.safetensors"))
    ra = load_file(os.path.join(out, "transformerlens", "recon.safetensors"))
    rb = load_file(os.path.join(out, "nnsight", "recon.safetensors"))
    res = {k: float((ra[k] - rb[k]).abs().max()) for k in ra if ra[k].shape == rb[k].shape}
    res = {f"recon_{k}_maxdiff": v for k, v in res.items()}
    res["same_active_features"] = bool(torch.equal(a["active_features"], b["active_features"]))
    res["same_logit_targets"] = bool(torch.equal(a["logit_targets"], b["logit_targets"]))
    if a["adjacency_matrix"].shape == b["adjacency_matrix"].shape and res["same_active_features"]:
        d = (a["adjacency_matrix"] - b["adjacency_matrix"]).abs()
        res["adjacency_maxdiff"] = float(d.max())
        res["adjacency_rel_maxdiff"] = float(d.max() / a["adjacency_matrix"].abs().max().clamp_min(1e-30))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--clt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="both", choices=["transformerlens", "nnsight", "both"])
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (machine is shared)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--make-dev-clt", action="store_true", help="write a random JumpReLU CLT to --clt first")
    p.add_argument("--dev-n-latents", type=int, default=1024)
    p.add_argument("--dev-target-l0", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    hf, tok = load_hf(args.model)
    ids = tokenize(tok, args.prompt)
    with torch.no_grad():
        ref_logits = hf(ids[None]).logits[0].float()

    if args.make_dev_clt:
        make_dev_clt(args.clt, hf, ids, args.dev_n_latents, args.dev_target_l0, args.seed)

    clt = load_ct_clt(args.clt)
    backends = ["transformerlens", "nnsight"] if args.backend == "both" else [args.backend]

    result: dict = {
        "prompt": args.prompt,
        "input_tokens": ids.tolist(),
        "clt": {"n_layers": clt.n_layers, "d_transcoder": clt.d_transcoder, "d_model": clt.d_model},
        "backends": {},
    }
    ok = True
    for backend in backends:
        try:
            result["backends"][backend] = run_backend(backend, args, hf, tok, ids, ref_logits, clt)
        except Exception as e:  # noqa: BLE001 -- report and continue with the other backend
            ok = False
            traceback.print_exc()
            result["backends"][backend] = {"backend": backend, "loaded": False, "error": f"{type(e).__name__}: {e}"}
    if len(backends) == 2 and ok:
        try:
            result["cross_backend"] = compare_backends(args.out)
        except Exception as e:  # noqa: BLE001
            result["cross_backend"] = {"error": f"{type(e).__name__}: {e}"}

    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
