#!/usr/bin/env python3
"""Makes the benchmark tree: a few large files and many small ones, incompressible.

usage: maketree.py DIR TOTAL_MB [SMALL_FILES]
About 80% of the bytes are in 4 large files, the rest in SMALL_FILES (default 10,000) small
files spread over 100 directories. Deterministic: the same arguments give the same tree.
"""
import os
import random
import sys

root, total_mb = sys.argv[1], int(sys.argv[2])
small = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
rng = random.Random(42)
total = total_mb << 20
large_bytes = total * 4 // 5
small_size = max(1, (total - large_bytes) // max(small, 1))
os.makedirs(root, exist_ok=True)
block = rng.randbytes(1 << 20)
for i in range(4):
    with open(os.path.join(root, f"large-{i}.bin"), "wb") as f:
        left = large_bytes // 4
        n = 0
        while left > 0:
            chunk = block[n % 997:] + block[: n % 997]
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
            n += 1
for i in range(small):
    d = os.path.join(root, f"dir-{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file-{i:05d}.dat"), "wb") as f:
        f.write(rng.randbytes(small_size))
