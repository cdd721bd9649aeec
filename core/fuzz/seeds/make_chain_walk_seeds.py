#!/usr/bin/env python3
"""Writes hand-made chain_walk inputs: rings holding valid direct, indirect and mixed chains, which
random bytes almost never produce. Layout as in fuzz_targets/chain_walk.rs: 4 control bytes, then
guest memory from GPA 0x1_0000 (descriptor table at +0, avail ring at +0x800, used ring at +0xa00)."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chain_walk")
BASE = 0x1_0000
AVAIL, USED, DATA, TABLES = 0x800, 0xA00, 0x1000, 0x3000
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seed(name, size_shift, features, heads, table, extra=(), last_avail=0):
    mem = bytearray(0x3400)
    for i, d in table.items():
        mem[16 * i:16 * i + 16] = d
    for off, blob in extra:
        mem[off:off + len(blob)] = blob
    struct.pack_into("<HH", mem, AVAIL, 0, (last_avail + len(heads)) & 0xFFFF)
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * ((last_avail + i) % (1 << size_shift)), h)
    ctl = bytes([size_shift, features]) + struct.pack("<H", last_avail)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(ctl + bytes(mem))


def blk3(first, data_addr):
    """header, data, status as descriptors first..first+2"""
    return {
        first: desc(BASE + DATA, 16, NEXT, first + 1),
        first + 1: desc(BASE + data_addr, 512, NEXT | WRITE, first + 2),
        first + 2: desc(BASE + DATA + 0x10, 1, WRITE),
    }


os.makedirs(HERE, exist_ok=True)
t = {}
for k in range(3):
    t.update(blk3(3 * k, DATA + 0x200 * (k + 1)))
seed("direct_three_requests", 4, 0, [0, 3, 6], t)
seed("direct_wrapping_indices", 4, 2, [6, 0, 3], t, last_avail=0xFFFE)

ind = desc(BASE + DATA, 16, NEXT, 1) + desc(BASE + DATA + 0x200, 4096, NEXT | WRITE, 2) + desc(BASE + DATA + 0x10, 1, WRITE)
seed("indirect", 4, 1, [0, 1], {0: desc(BASE + TABLES, 48, INDIRECT), **blk3(1, DATA + 0x400)},
     extra=[(TABLES, ind)])
seed("direct_then_indirect", 3, 3, [0],
     {0: desc(BASE + DATA, 16, NEXT, 1), 1: desc(BASE + TABLES, 32, INDIRECT)},
     extra=[(TABLES, desc(BASE + DATA + 0x200, 512, NEXT | WRITE, 1) + desc(BASE + DATA + 0x10, 1, WRITE))])
long_chain = {i: desc(BASE + DATA + 16 * i, 16 if i != 5 else 0, (NEXT if i < 19 else 0) | (WRITE if i >= 10 else 0), i + 1) for i in range(20)}
seed("long_chain_with_empty_descriptor", 7, 0, [0], long_chain)
seed("total_over_4gib", 4, 0, [0], {0: desc(BASE + DATA, 16, NEXT, 1), 1: desc(BASE + DATA + 0x100, 0xFFFFFFFF, WRITE)})
