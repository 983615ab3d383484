"""What a store holds: position kinds, sites, on-disk dtypes, the manifest's name and format, per-token metadata fields."""

from __future__ import annotations

from ..devices import DTYPES
from ..sites import INPUT_SITES  # noqa: F401  (re-exported: the store's vocabulary)

KINDS = ("image", "text", "answer")  # position kinds; the `kind` array stores their index
TARGET_SITE = "mlp_out"
STORE_DTYPES = DTYPES  # every dtype the package knows can be stored
MANIFEST = "manifest.json"
FORMAT = "clt-lite-activations/1"
META_FIELDS = ("token_id", "position", "sample", "kind", "bos")
META_BYTES = 4 + 4 + 8 + 1 + 1  # token_id int32, position int32, sample int64, kind uint8, bos bool
