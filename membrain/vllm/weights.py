"""A fingerprint of a model's weights for KV keys: a new checkpoint under the same path must
never reuse the KV of the old one.

For a local model directory: the size and the safetensors header (tensor names, dtypes, shapes,
offsets) of every weight file, the index file, and 64 KiB samples of the data at 16 places per
file (start, end and evenly between). A retrained or fine-tuned checkpoint changes its data
everywhere, so the samples catch it without reading gigabytes at start-up; a change confined to
bytes no sample touches would be missed, which is why in-place weight updates must go through
vLLM's ``reset_prefix_cache`` (Membrain's ``reset_cache`` moves to a new key epoch). For a hub
model id (no local directory) the fingerprint is the id plus the requested revision.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 << 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MAX_SAFETENSORS_HEADER = 100 << 20


def _file_digest(h: hashlib._Hash, path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if path.endswith(".safetensors") and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= min(size - 8, MAX_SAFETENSORS_HEADER):
                h.update(f.read(n))
        for k in range(SAMPLES_PER_FILE):
            off = (size - SAMPLE_BYTES) * k // max(1, SAMPLES_PER_FILE - 1) if size > SAMPLE_BYTES else 0
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES))


@functools.lru_cache(maxsize=8)
def weights_fingerprint(model: str, revision: str | None = None) -> str:
    """32 hex chars identifying the weights of ``model`` (a directory or a hub id)."""
    h = hashlib.sha256()
    if not os.path.isdir(model):
        h.update(f"hub:{model}@{revision}".encode())
        return h.hexdigest()[:32]
    names = sorted(os.listdir(model))
    for name in names:
        path = os.path.join(model, name)
        if name.endswith(".index.json") and os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + f.read())
        elif name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(path):
            _file_digest(h, path)
    return h.hexdigest()[:32]
