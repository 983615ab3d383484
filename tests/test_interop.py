"""Interop with circuit-tracer that runs in our own venv: the language model written as a Llama folder computes what
the LLaVA computes, and the README's `make interop` figures are those of the committed measurement (circuit-tracer
itself needs its own venv: `make interop`, which CI runs)."""

import json
from pathlib import Path

import torch

from clt_lite import circuit_tracer, data

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "interop-cpu.json"


def test_language_model_export_loads_as_llama_with_the_same_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = circuit_tracer.export_language_model(tiny, tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(llama).__name__ == "LlamaForCausalLM"
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == tiny.model.config.text_config.rope_parameters["rope_theta"]  # where 4.x reads it
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    encoded = data.encode_batch(tiny.processor, [data.Sample(None, "What color is the circle?", "", "text")])
    assert torch.equal(tokenizer(data.sample_prompt(data.Sample(None, "What color is the circle?", "", "text")),
                                 return_tensors="pt").input_ids, encoded.input_ids)
    with torch.no_grad():
        ours = tiny.model(**encoded.model_inputs(tiny.model)).logits
        theirs = llama(encoded.input_ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def figures(result: dict) -> dict[str, str]:
    """The README's figures, formatted from interop/check.py's JSON line."""
    backends = result["backends"].values()
    graphs = [b[name] for b in backends for name in ("full", "capped")]
    return {"logits": f"{max(b['logits_rel_error'] for b in backends):.1e}",
            "recon": f"{max(b['reconstruction_rel_error_max'] for b in backends):.1e}",
            "adjacency": f"{max(g['adjacency_rel_error'] for g in graphs):.1e}",
            "scores": f"{max(g['score_gap'] for g in graphs):.1e}",
            "n_full": f"{graphs[0]['n_features']:,}", "n_capped": f"{graphs[1]['n_features']:,}"}


def test_readme_states_the_committed_interop_measurement():
    result = json.loads(RESULT.read_text())
    assert result["ok"] and result["topk_export_refused"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    for name, value in figures(result).items():
        assert value in readme, f"README should state {name} = {value} from {RESULT.name}"
