#!/usr/bin/env python3
"""Checks a raw disk image after `rvhost-perf --verify` runs against it.

The image starts as random bytes. rvhost-perf stamps every block it writes with a 24-byte header
(magic, block number, generation) and a pseudo-random stream derived from (block, generation)
(`bench/src/workload.rs`, `fill_pattern`). So each block found with the magic must sit at
`block * block_size` and hold exactly that pattern. Two block sizes are checked: 4 KiB and
128 KiB (the two runs of `NVME_GUEST_MODE=bdev scripts/nvme-guest-test.sh`).

With --ops, the last MiB is checked too: `target/tests/bdev_nvme_guest_ops.rs` wrote 256 KiB of a
per-sector pattern at 31 MiB (each sector starting with its own number), then zeroed the 64 KiB
starting 64 KiB in; what perf left there is not checked.

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


OPS_REGION = 31 * 1024 * 1024
OPS_BYTES = 256 * 1024
OPS_ZERO = (64 * 1024, 128 * 1024)


def ops_expected() -> bytes:
    out = bytearray()
    first = OPS_REGION // 512
    for i in range(OPS_BYTES // 512):
        number = first + i
        sector = bytearray(struct.pack("<Q", number))
        for j in range(8, 512):
            sector.append((((number & 0xFF) * 7) & 0xFF) ^ ((j * 31) & 0xFF) ^ 0x5A)
        out += sector
    out[OPS_ZERO[0]:OPS_ZERO[1]] = bytes(OPS_ZERO[1] - OPS_ZERO[0])
    return bytes(out)


def main() -> int:
    args = sys.argv[1:]
    ops = "--ops" in args
    args = [a for a in args if a != "--ops"]
    if len(args) != 1:
        print("usage: check-perf-image.py [--ops] IMAGE", file=sys.stderr)
        return 2
    with open(args[0], "rb") as f:
        data = f.read()
    if ops:
        if data[OPS_REGION:OPS_REGION + OPS_BYTES] != ops_expected():
            print("check-perf-image: the ops region at 31 MiB does not hold the guest test's data",
                  file=sys.stderr)
            return 1
        print("check-perf-image: ops region (256 KiB at 31 MiB, 64 KiB of it zeroed) intact")
        # Perf blocks overwritten there by the ops test are not perf's any more.
        data = data[:OPS_REGION] + bytes(OPS_BYTES) + data[OPS_REGION + OPS_BYTES:]
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
