"""The replacement model: every MLP output replaced by the CLT's reconstruction, and token match.

Closed loop (the default, what "replacement model" means): the CLT reads the replacement
model's *own* residual stream as it flows, so errors made at early layers change what later
layers see. Open loop (diagnosis): the CLT reads the original model's activations. With
`errors` the exact reconstruction error of the original run is added back, so the output
equals the original (a correctness check the attribution graphs rely on).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import data, sites
from .choices import Loop, ReplacementKind, check
from .clt import CrossLayerTranscoder
from .models import generate_answers


@dataclass
class FVUAccumulator:
    """Per-layer sums for the fraction of variance unexplained of a reconstruction.

    FVU_l = sum ||pred - true||^2 / sum ||true - mean(true)||^2 over kept tokens, with the
    variance computed from running sums so batches can be accumulated.
    """

    n_layers: int
    error: torch.Tensor = field(init=False)  # [L] sum of squared errors
    total: torch.Tensor = field(init=False)  # [L] sum of squared norms of the truth
    mean_sum: torch.Tensor | None = field(init=False, default=None)  # [L, d] sum of the truth
    counts: torch.Tensor = field(init=False)  # [L] tokens seen

    def __post_init__(self) -> None:
        self.error, self.total, self.counts = (torch.zeros(self.n_layers) for _ in range(3))

    def add(self, layer: int, predicted: torch.Tensor, true: torch.Tensor) -> None:
        """predicted, true: [n_tokens, d] in raw units."""
        predicted, true = predicted.float().cpu(), true.float().cpu()
        if self.mean_sum is None:
            self.mean_sum = torch.zeros(self.n_layers, true.shape[-1])
        self.error[layer] += (predicted - true).pow(2).sum()
        self.total[layer] += true.pow(2).sum()
        self.mean_sum[layer] += true.sum(0)
        self.counts[layer] += true.shape[0]

    def fvu(self) -> torch.Tensor:
        """[L] FVU per layer (NaN for layers never seen)."""
        counts = self.counts.clamp(min=1)
        variance = self.total - self.mean_sum.pow(2).sum(-1) / counts
        return self.error / variance


class Replacement:
    """What replaces the MLP outputs: a CLT (closed or open loop) or an ablation."""

    def __init__(self, kind: str, clt: CrossLayerTranscoder | None = None, loop: str = "closed",
                 means: torch.Tensor | None = None, layers: Sequence[int] | None = None, name: str | None = None,
                 exact: bool = False):
        check("replacement", kind, ReplacementKind)
        if kind == "clt" and clt is None:
            raise ValueError("a clt replacement needs a trained CLT")
        if kind == "mean" and means is None:
            raise ValueError("mean ablation needs the mean MLP output per layer (mlp_out_means)")
        check("loop", loop, Loop)
        if exact and kind != "clt":
            raise ValueError("exact error add-back applies to a clt replacement only")
        self.kind, self.clt, self.loop, self.means, self.layers, self.exact = kind, clt, loop, means, layers, exact
        self.name = name or (f"{kind} ({loop} loop{', exact' if exact else ''})" if kind == "clt" else f"MLP {kind}-ablation")


def check_compatible(clt: CrossLayerTranscoder, model) -> None:
    """A CLT trained on another model (layers, width) is refused with one line."""
    config = model.config.text_config
    if (clt.config.n_layers, clt.config.d_model) != (config.num_hidden_layers, config.hidden_size):
        raise ValueError(
            f"the CLT was trained for {clt.config.n_layers} layers of width {clt.config.d_model}, the model has "
            f"{config.num_hidden_layers} layers of width {config.hidden_size}; train a CLT on this model's activations"
        )
    if not torch.isfinite(clt.input_scale).all() or not (clt.input_scale > 0).all():
        raise ValueError("the CLT's normalisation scales are missing or invalid; re-train or re-save it with its scales")


@contextmanager
def replaced(model, replacement: Replacement, open_loop_inputs: torch.Tensor | None = None,
             errors: torch.Tensor | None = None, fvu: FVUAccumulator | None = None,
             positions: torch.Tensor | None = None, train_errors: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Run `model` with its MLP outputs replaced inside the block.

    open_loop_inputs: [batch, seq, L, d] input-site activations of the original model (open loop).
    errors: [batch, seq, L, d] original mlp_out minus the CLT's open-loop reconstruction;
        added back at every replaced layer so the replacement reproduces the original exactly.
    fvu / positions: accumulate, at the kept positions, the FVU of the replacement against the
        true MLP output *on the same residual stream* (in the closed loop errors compound here).
    """
    clt = replacement.clt
    n_layers = len(sites.decoder_layers(model))
    chosen = set(range(n_layers) if replacement.layers is None else replacement.layers)
    if clt is not None:
        check_compatible(clt, model)
    pending: dict[int, torch.Tensor] = {}  # closed loop: decoder sums waiting for their target layer

    def clt_output(layer: int, resid_mid: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        x = resid_mid if clt.config.input_site == "resid_mid" else mlp_in
        if replacement.loop == "open":
            x = open_loop_inputs[..., layer, :].to(x.device)
        flat = x.reshape(-1, x.shape[-1]).to(clt.b_dec.dtype) * clt.input_scale[layer].to(clt.b_dec.dtype)
        values, indices = clt.encode_layer(layer, flat)
        for offset, contribution in enumerate(clt.decode_source(layer, values, indices).unbind(1)):
            pending[layer + offset] = pending.get(layer + offset, 0) + contribution
        out = pending.pop(layer) + clt.b_dec[layer]
        if clt.config.skip_connection:
            out = out + flat @ clt.W_skip[layer]
        return (out / clt.target_scale[layer]).reshape(x.shape)

    def patch(layer: int, mlp_out: torch.Tensor, resid_mid: torch.Tensor, mlp_in: torch.Tensor):
        if replacement.kind == "zero":
            new = torch.zeros_like(mlp_out)
        elif replacement.kind == "mean":
            new = replacement.means[layer].to(mlp_out).expand_as(mlp_out)
        else:
            with torch.set_grad_enabled(train_errors is not None):
                new = clt_output(layer, resid_mid, mlp_in).to(mlp_out.dtype)
        if train_errors is not None and layer in chosen:
            true = mlp_out[positions].detach()
            train_errors.append((new[positions] - true).pow(2).sum() / (true - true.mean(0)).pow(2).sum().clamp(min=1e-12))
        if fvu is not None and positions is not None and mlp_out.shape[:2] == positions.shape:
            fvu.add(layer, new[positions], mlp_out[positions])
        if errors is not None:
            new = new + errors[..., layer, :].to(new)
        return new if layer in chosen else None

    with sites.patch_mlp_out(model, patch):
        yield
    pending.clear()


def reconstruction_errors(clt: CrossLayerTranscoder, inputs: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    """[..., L, d] original mlp_out minus the CLT's reconstruction from the original inputs (raw units)."""
    flat = inputs.reshape(-1, *inputs.shape[-2:]).to(clt.b_dec.device)
    return mlp_out - clt.reconstruct_raw(flat).reshape(mlp_out.shape).to(mlp_out)


def mlp_out_means(model, processor, samples: list[data.Sample], batch_size: int = 16) -> torch.Tensor:
    """[L, d] mean MLP output per layer over real tokens (for mean-ablation)."""
    total, count = None, 0
    for start in range(0, len(samples), batch_size):
        batch = data.encode_batch(processor, samples[start : start + batch_size], with_answers=True)
        keep = batch.attention_mask.bool()
        with sites.capture(model, sites=["mlp_out"], positions=keep) as captured, torch.no_grad():
            model(**batch.model_inputs(model))
        acts = captured.stack("mlp_out").float()
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += acts.shape[0]
    return total / count




class TokenMatch(NamedTuple):
    """How faithfully a replacement stands in for the original model's MLPs."""

    name: str  # which replacement
    top1_text: float  # teacher-forced next-token argmax agreement, all text positions
    top1_answer: float  # the same, at positions that predict answer tokens
    top1_filtered: float  # the same, where the original gives the true next token p < 0.8 (the paper's subset)
    kl: float  # mean KL(original || replacement) over text positions, nats
    ce_increase: float  # answer-token cross-entropy, replacement minus original, nats
    generated_token_agreement: float  # greedy generation: fraction of answer tokens equal to the original's
    generated_exact_match: float  # greedy generation: whole answers equal to the original's
    accuracy_original: dict  # task accuracy per question family (and 'all'), original model
    accuracy_replacement: dict  # the same for the replacement model
    fvu: list  # [L] FVU of the replacement against the true MLP on the same residual stream
    n_text: int  # text positions scored
    n_answer: int  # answer positions scored


def _input_site(replacement: Replacement) -> str:
    return replacement.clt.config.input_site if replacement.clt is not None else "resid_mid"


def token_match(loaded, replacement: Replacement, samples: list[data.Sample], batch_size: int = 16,
                generate: bool = True, max_new_tokens: int = 6) -> TokenMatch:
    """Score a replacement against the original model over samples (one teacher-forced pass each,
    plus greedy generation when `generate`)."""

    model, processor = loaded.model, loaded.processor
    if not samples:
        raise ValueError("the dataset is empty; give at least one sample")
    n_layers = len(sites.decoder_layers(model))
    fvu = FVUAccumulator(n_layers)
    sums = dict(top1_text=0.0, top1_answer=0.0, top1_filtered=0.0, kl=0.0, ce=0.0, n_text=0, n_answer=0, n_filtered=0)
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = data.encode_batch(processor, chunk, with_answers=True)
        inputs = batch.model_inputs(model)
        real = batch.attention_mask.bool()
        site = _input_site(replacement)
        with torch.no_grad(), sites.capture(model, sites=[site, "mlp_out"]) as captured:
            original = model(**inputs).logits.float().cpu()
        open_inputs = captured.stack(site) if replacement.loop == "open" else None
        errors = reconstruction_errors(replacement.clt, captured.stack(site), captured.stack("mlp_out")) if replacement.exact else None
        closed_fvu = fvu if replacement.loop == "closed" else None
        with torch.no_grad(), replaced(model, replacement, open_loop_inputs=open_inputs, errors=errors, fvu=closed_fvu,
                                       positions=real.to(inputs["input_ids"].device)):
            patched = model(**inputs).logits.float().cpu()
        if replacement.loop == "open":  # open loop: against the original MLP outputs
            predicted = replacement.clt.reconstruct_raw(open_inputs[real].to(replacement.clt.b_dec.device)).cpu()
            for layer in range(n_layers):
                fvu.add(layer, predicted[:, layer], captured["mlp_out"][layer][real])
        _score_batch(sums, hits, chunk, batch, original, patched, loaded.image_token_id)
    if sums["n_answer"] == 0:
        raise ValueError("the dataset has no answer positions; token match needs samples with answers")
    original_answers = replacement_answers = []
    if generate and replacement.loop == "closed" and not replacement.exact:  # open loop needs the original's inputs
        original_answers = generate_answers(loaded, samples, max_new_tokens)
        with replaced(model, replacement):
            replacement_answers = generate_answers(loaded, samples, max_new_tokens)
    agreement, exact = _generation_agreement(processor.tokenizer, original_answers, replacement_answers)
    accuracy = {which: _accuracy(hits, i) for i, which in enumerate(("original", "replacement"))}
    return TokenMatch(
        replacement.name, sums["top1_text"] / sums["n_text"], sums["top1_answer"] / sums["n_answer"],
        sums["top1_filtered"] / max(1, sums["n_filtered"]), sums["kl"] / sums["n_text"], sums["ce"] / sums["n_answer"],
        agreement, exact, accuracy["original"], accuracy["replacement"], fvu.fvu().tolist(), sums["n_text"], sums["n_answer"],
    )


def text_targets(batch: data.EncodedBatch, image_token_id: int) -> torch.Tensor:
    """[batch, seq - 1] bool: next-token targets that are real text (not padding, not image patches), where KL and
    top-1 agreement are averaged (token match here, the fine-tuning loss in clt_lite.closed_loop)."""
    targets = batch.input_ids[:, 1:]
    return batch.attention_mask[:, 1:].bool() & (targets != image_token_id)


def _score_batch(sums, hits, chunk, batch, original, patched, image_token_id) -> None:
    """Teacher-forced metrics: the logits at position t predict token t+1."""
    targets = batch.input_ids[:, 1:]
    text = text_targets(batch, image_token_id)
    answer = batch.answer_mask[:, 1:]
    log_p, log_q = F.log_softmax(original[:, :-1], -1), F.log_softmax(patched[:, :-1], -1)
    agree = log_p.argmax(-1) == log_q.argmax(-1)
    p_true = log_p.gather(-1, targets[..., None]).squeeze(-1).exp()
    filtered = text & (p_true < 0.8)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce_increase = (log_p - log_q).gather(-1, targets[..., None]).squeeze(-1)
    sums["top1_text"] += agree[text].sum().item()
    sums["top1_answer"] += agree[answer].sum().item()
    sums["top1_filtered"] += agree[filtered].sum().item()
    sums["kl"] += kl[text].sum().item()
    sums["ce"] += ce_increase[answer].sum().item()
    sums["n_text"] += int(text.sum())
    sums["n_answer"] += int(answer.sum())
    sums["n_filtered"] += int(filtered.sum())
    right_original, right_patched = batch.answers_correct(original), batch.answers_correct(patched)
    for sample, a, b in zip(chunk, right_original.tolist(), right_patched.tolist()):
        hits.setdefault(sample.family, []).append((a, b))


def _accuracy(hits: dict, which: int) -> dict:
    result = {family: sum(h[which] for h in v) / len(v) for family, v in sorted(hits.items())}
    result["all"] = sum(h[which] for v in hits.values() for h in v) / sum(len(v) for v in hits.values())
    return result


def _generation_agreement(tokenizer, original: list[str], replacement: list[str]) -> tuple[float, float]:
    """Per-token agreement (position by position, over the original answer's tokens) and exact match."""
    if not original:
        return float("nan"), float("nan")
    same = total = 0
    for a, b in zip(original, replacement):
        ids_a, ids_b = tokenizer(a, add_special_tokens=False)["input_ids"], tokenizer(b, add_special_tokens=False)["input_ids"]
        total += max(1, len(ids_a))
        same += sum(x == y for x, y in zip(ids_a, ids_b)) if ids_a else int(not ids_b)
    return same / total, sum(a == b for a, b in zip(original, replacement)) / len(original)


def agreement_by_depth(loaded, clt: CrossLayerTranscoder, samples: list[data.Sample], batch_size: int = 16) -> list[float]:
    """Answer-position top-1 agreement when the first l+1 layers are replaced (closed loop), l = 0..L-1."""
    return [
        token_match(loaded, Replacement("clt", clt, layers=range(l + 1)), samples, batch_size, generate=False).top1_answer
        for l in range(clt.config.n_layers)
    ]


# Columns of the token-match table: (header, width, format, value). Agreement columns are fractions of positions
# or answers; divergence columns are KL and cross-entropy increase (nats), which vary more between runs.
AGREEMENT_COLUMNS = (
    ("top1 text", 9, ".3f", lambda r: r.top1_text),
    ("top1 ans", 8, ".3f", lambda r: r.top1_answer),
    ("top1 filt", 9, ".3f", lambda r: r.top1_filtered),
    ("gen tok", 7, ".3f", lambda r: r.generated_token_agreement),
    ("gen exact", 9, ".3f", lambda r: r.generated_exact_match),
    ("acc orig", 8, ".3f", lambda r: r.accuracy_original["all"]),
    ("acc repl", 8, ".3f", lambda r: r.accuracy_replacement["all"]),
)
DIVERGENCE_COLUMNS = (
    ("KL", 8, ".4f", lambda r: r.kl),
    ("dCE ans", 8, ".3f", lambda r: r.ce_increase),
)


# Metrics on which notebook 04 compares the CLT with the PLT; for all but KL higher is better.
CLT_VS_PLT_METRICS = ("top1_text", "top1_answer", "top1_filtered", "kl")


def versus_sentence(ours: TokenMatch, theirs: TokenMatch, our_name: str, their_name: str,
                    metrics: tuple[str, ...] = CLT_VS_PLT_METRICS) -> str:
    """Which of two replacements is ahead on each metric, in words (lower KL is better, higher otherwise)."""
    ahead: dict[str, list[str]] = {our_name: [], their_name: [], "neither": []}
    for metric in metrics:
        a, b = getattr(ours, metric), getattr(theirs, metric)
        better = a < b if metric == "kl" else a > b
        ahead[our_name if better else (their_name if a != b else "neither")].append(f"{metric} ({a - b:+.3f})")
    parts = [f"**{who}** ahead on {', '.join(items)}" for who, items in ahead.items() if items and who != "neither"]
    if ahead["neither"]:
        parts.append(f"tied on {', '.join(ahead['neither'])}")
    return f"{our_name} − {their_name}: " + "; ".join(parts) + "."


def mlp0_sentence(kl_all: float, kl_kept0: float, kl_only0: float) -> str:
    """What keeping MLP 0 original buys, in words, from the closed-loop KL three ways (all, MLP 0 kept, MLP 0 only)."""
    removed = 1 - kl_kept0 / kl_all
    sentence = (f"Keeping MLP 0 original takes away {'most' if removed > 0.5 else 'part'} of the divergence "
                f"({removed:.0%}, KL {kl_all:.2f} -> {kl_kept0:.2f})")
    if kl_all - kl_kept0 > kl_only0:
        return sentence + (f", more than replacing MLP 0 *alone* costs (KL {kl_only0:.2f}): MLP 0's small error is "
                           "amplified by the layers after it.")
    return sentence + f"; replacing MLP 0 alone costs about as much (KL {kl_only0:.2f}): its error is not amplified here."


def format_table(rows: list[TokenMatch], columns=AGREEMENT_COLUMNS + DIVERGENCE_COLUMNS) -> str:
    """The token-match table, one replacement per line; `columns` picks AGREEMENT_COLUMNS, DIVERGENCE_COLUMNS or all."""
    lines = [f"{'replacement':<26}" + " ".join(f"{header:>{width}}" for header, width, _, _ in columns)]
    for r in rows:
        lines.append(f"{r.name:<26}" + " ".join(f"{value(r):>{width}{spec}}" for _, width, spec, value in columns))
    return "\n".join(lines)
