"""Activations for CLT training: a sharded on-disk store, and a streaming source that needs no disk.

`capture()` runs the model over a dataset (teacher-forced: prompt + answer + EOS) and writes, for
every kept token, the CLT's input site (resid_mid, optionally or instead mlp_in) and its target
site (mlp_out) of the chosen layers, plus token id, position, sample index, kind (image / text /
answer) and a BOS flag. Each MLP output is stored once: the CLT reads layer l's input and
predicts every target t >= l from the same [tokens, layers, d] array.

On disk: `shard-00000.safetensors`, ... (token-major [tokens, layers, d] per site) and
`manifest.json` (model, sites, layers, dtype, token counts, per-layer mean squared norms, one
sha256 per shard, package version, capture arguments). Shard i holds samples [i*S, (i+1)*S),
forwarded in batches that start at the shard's first sample, so a shard is a pure function of
(arguments, i). Every file is written to a temporary name and renamed; the manifest is rewritten
after each shard. A capture killed at any moment and rerun with the same arguments therefore
continues after the last complete shard and ends bit-identical to an uninterrupted run.

`ActivationStore` (disk) and `StreamingSource` (model -> memory) both give what the trainer
needs: `n_layers`, `d_model`, `input_scale`/`target_scale` [L] (normalised = raw * scale, so the
mean squared norm per layer is ~d) and `batches(batch_size, split, seed)` of ActivationBatch,
float32, normalised, BOS excluded, shuffled at token level, split into train/val by sample.

Storage math: 2 sites x 32 layers x 4096 x 2 B = 512 KiB per token for LLaVA-1.5-7B in bf16,
so 1M tokens is ~0.5 TB. At that scale stream; store the toy.

Modules, each importing only those listed before it: `schema` (kinds, sites, format constants),
`batching` (scales, train/val split, shuffled batches), `forward` (one teacher-forced forward pass),
`capturing` (CaptureConfig, capture), `reader` (ActivationStore), `streaming` (StreamingSource).
"""

from .batching import _scale
from .capturing import CaptureConfig, CaptureSummary, bytes_per_token, capture, free_bytes
from .forward import TokenChunk, forward_tokens
from .reader import ActivationStore, ShardInfo, TokenMeta, check_compatible
from .schema import FORMAT, INPUT_SITES, KINDS, MANIFEST, META_BYTES, META_FIELDS, STORE_DTYPES, TARGET_SITE
from .streaming import StreamingSource
