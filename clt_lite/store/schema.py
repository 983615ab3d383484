"""What a store holds: position kinds, sites, on-disk dtypes, the manifest's name and format, per-token metadata fields."""

from __future__ import annotations

import torch

KINDS = ("image", "text", "answer")  # position kinds; the `kind` array stores their index
INPUT_SITES = ("resid_mid", "mlp_in")  # sites a CLT may read; the target is always mlp_out
TARGET_SITE = "mlp_out"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MANIFEST = "manifest.json"
FORMAT = "clt-lite-activations/1"
META_FIELDS = ("token_id", "position", "sample", "kind", "bos")
META_BYTES = 4 + 4 + 8 + 1 + 1  # token_id int32, position int32, sample int64, kind uint8, bos bool
