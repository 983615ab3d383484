"""circuit-tracer's side of `make interop` (interop/check.py runs it): load a Llama folder and a CLT in circuit-tracer's
layout into circuit-tracer 0.5's ReplacementModel on each backend, and write what it computes on the given token ids.

Runs only in the interop venv (transformers <= 4.57, nnsight 0.6.1, transformer-lens): it must not import clt_lite.
Per backend, OUT/<backend>/ gets recon.safetensors (logits [S, V], the CLT's inputs at mlp.hook_in and the MLP outputs
[L, S, d], circuit-tracer's reconstruction [L, S, d]), graph.safetensors (adjacency, active and selected features,
logit targets and probabilities) and scores.json (replacement and completeness, circuit_tracer.graph.compute_graph_scores).

Token ids are passed, not text: circuit-tracer tokenizes text without special tokens and prepends BOS only when the
first token is not special, and <unk> counts as special, so a prompt starting with an unknown word would lose its BOS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"  # what clt_lite exports for an mlp_in CLT
DTYPE = torch.float32


def load_clt(path: str):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt

    return ct_load_clt(path, feature_input_hook=INPUT_HOOK, feature_output_hook=OUTPUT_HOOK, dtype=DTYPE,
                       device=torch.device("cpu"), lazy_decoder=False)


def tl_config(model_dir: str, hf_config):
    """TransformerLens's config of a local Llama, built here: its own converter ignores rope_theta (it would run
    rotary embeddings at base 10000, not the model's)."""
    from transformer_lens import HookedTransformerConfig

    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    return HookedTransformerConfig(
        model_name=os.path.abspath(model_dir), original_architecture="LlamaForCausalLM",
        n_layers=hf_config.num_hidden_layers, d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None, d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size, n_ctx=hf_config.max_position_embeddings, act_fn=hf_config.hidden_act,
        eps=hf_config.rms_norm_eps, normalization_type="RMS", final_rms=True, gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_adjacent_pairs=False,
        rotary_base=float(hf_config.rope_theta), tokenizer_prepends_bos=True, default_prepend_bos=True, device="cpu",
        dtype=DTYPE)


def load_transformerlens(model_dir: str, clt):
    """What TransformerLensReplacementModel.from_pretrained_and_transcoders does, without its official-name lookup
    (HookedTransformer.from_pretrained refuses a local folder): config, weights converted from the HF model, then the
    transcoders configured."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    cfg = tl_config(model_dir, hf.config)
    model = TransformerLensReplacementModel(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir), move_to_device=True)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    model._configure_replacement_model(clt)  # the call circuit-tracer's own loaders make
    return model.eval()


def load_nnsight(model_dir: str, clt):
    from circuit_tracer import ReplacementModel

    return ReplacementModel.from_pretrained_and_transcoders(model_name=model_dir, transcoders=clt, backend="nnsight",
                                                            device=torch.device("cpu"), dtype=DTYPE)


@torch.no_grad()
def cache_transformerlens(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = [f"blocks.{layer}.{hook}" for hook in (INPUT_HOOK, OUTPUT_HOOK) for layer in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(ids[None], names_filter=lambda name: name in names)
    L = model.cfg.n_layers
    return logits[0], torch.stack([cache[n][0] for n in names[:L]]), torch.stack([cache[n][0] for n in names[L:]])


@torch.no_grad()
def cache_nnsight(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The locations setup_attribution reads (for Llama: post_attention_layernorm's output, the MLP's output), read in
    the order the forward pass reaches them (nnsight requires it)."""
    from nnsight import save

    with model.trace(ids):
        inputs, outputs = [], []
        for layer in range(model.cfg.n_layers):
            inputs.append(model.get_feature_input_loc(layer).output)
            y = model.get_feature_output_loc(layer).output
            outputs.append(y.reshape(1, *y.shape[-2:]))
        inputs, outputs = save(torch.cat(inputs)), save(torch.cat(outputs))
        logits = save(model.output.logits)
    return logits[0], inputs, outputs


def run_backend(backend: str, model_dir: str, clt, ids: torch.Tensor, out: Path, max_n_logits: int,
                desired_logit_prob: float, max_feature_nodes: int | None, batch_size: int) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    model = load_transformerlens(model_dir, clt) if backend == "transformerlens" else load_nnsight(model_dir, clt)
    assert torch.equal(model.ensure_tokenized(ids).cpu(), ids), "circuit-tracer changed the token ids"
    logits, inputs, mlp_out = (cache_transformerlens if backend == "transformerlens" else cache_nnsight)(model, ids)
    with torch.no_grad():
        reconstruction = clt(inputs)  # circuit-tracer's encode -> sparse decode (+ b_dec)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits.float().contiguous(), "inputs": inputs.float().contiguous(),
               "mlp_out": mlp_out.float().contiguous(), "reconstruction": reconstruction.float().contiguous()},
              str(out / "recon.safetensors"))
    graph = attribute(ids, model, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                      max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    save_file({"adjacency_matrix": graph.adjacency_matrix.float().contiguous(),
               "active_features": graph.active_features.long().contiguous(),
               "selected_features": graph.selected_features.long().contiguous(),
               "activation_values": graph.activation_values.float().contiguous(),
               "logit_targets": graph.logit_token_ids.long().cpu().contiguous(),
               "logit_probabilities": graph.logit_probabilities.float().contiguous()}, str(out / "graph.safetensors"))
    replacement, completeness = compute_graph_scores(graph)
    scores = {"replacement": replacement, "completeness": completeness, "zero_positions":
              [model.zero_positions.start, model.zero_positions.stop], "n_active_features": len(graph.active_features)}
    (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a LlamaForCausalLM folder")
    parser.add_argument("--clt", required=True, help="a CLT folder in circuit-tracer's layout")
    parser.add_argument("--token-ids", required=True, help="comma-separated prompt token ids, BOS first")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--backend", default="both", choices=["transformerlens", "nnsight", "both"])
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per backward pass; under a cap it sets when "
                        "the features are re-ranked (every 4 batches)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ids = torch.tensor([int(i) for i in args.token_ids.split(",")])
    clt = load_clt(args.clt)
    backends = ["transformerlens", "nnsight"] if args.backend == "both" else [args.backend]
    results = {backend: run_backend(backend, args.model, clt, ids, args.out / backend, args.max_n_logits,
                                    args.desired_logit_prob, args.max_feature_nodes, args.batch_size)
               for backend in backends}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
