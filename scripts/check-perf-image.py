#!/usr/bin/env python3
"""Checks a raw disk image after `rvhost-perf --verify` runs against it.

The image starts as random bytes. rvhost-perf stamps every block it writes with a 24-byte header
(magic, block number, generation) and a pseudo-random stream derived from (block, generation)
(`bench/src/workload.rs`, `fill_pattern`). So each block found with the magic must sit at
`block * block_size` and hold exactly that pattern. Two block sizes are checked: 4 KiB and
128 KiB (the two runs of `NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh`).

Exit status 0 when at least one block of each size was found and all found blocks are intact.
"""

import struct
import sys

MAGIC = 0x7276_6870_6572_6621
MASK = (1 << 64) - 1
SIZES = (128 * 1024, 4096)


def pattern(block: int, generation: int, length: int) -> bytes:
    header = struct.pack("<QQI", MAGIC, block, generation) + b"\0" * 4
    state = ((block * 0x9E37_79B9_7F4A_7C15) & MASK) ^ generation
    if state == 0:
        state = 0x9E37_79B9_7F4A_7C15
    words = []
    for i in range(length // 8):
        x = state
        x ^= x >> 12
        x ^= (x << 25) & MASK
        x ^= x >> 27
        state = x
        word = (x * 0x2545_F491_4F6C_DD1D) & MASK
        words.append(word)
    body = struct.pack(f"<{len(words)}Q", *words)
    return header + body[24:length]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check-perf-image.py IMAGE", file=sys.stderr)
        return 2
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    found = {size: 0 for size in SIZES}
    bad = 0
    offset = 0
    while offset + 4096 <= len(data):
        magic, block, generation = struct.unpack_from("<QQI", data, offset)
        step = 4096
        if magic == MAGIC:
            matched = False
            for size in SIZES:
                if block * size != offset or offset + size > len(data):
                    continue
                if data[offset:offset + size] == pattern(block, generation, size):
                    found[size] += 1
                    step = size
                    matched = True
                    break
            if not matched:
                bad += 1
                if bad <= 5:
                    print(f"check-perf-image: bad block at byte {offset}: header says block "
                          f"{block} generation {generation}", file=sys.stderr)
        offset += step
    print(f"check-perf-image: intact 4 KiB blocks {found[4096]}, 128 KiB blocks "
          f"{found[128 * 1024]}, bad {bad}")
    if bad or not all(found.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
