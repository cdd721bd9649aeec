#!/usr/bin/env python3
"""Writes hand-made packed_ring inputs: rings holding valid direct and indirect lists, a list that
wraps around the ring, a long batch and a few broken rings, which random bytes almost never
produce. Layout as in fuzz_targets/packed_ring.rs: 4 control bytes (size - 1, flags, start
position with the wrap counter in bit 15), then guest memory from GPA 0x1_0000 (descriptor ring at
+0, driver event suppression at +0x800, device event suppression at +0x804)."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_ring")
BASE = 0x1_0000
DRIVER_EVENT, DATA, TABLES = 0x800, 0x1000, 0x3000
NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
# ctl[1] bits: 0 INDIRECT_DESC, 1 EVENT_IDX, 2-3 return order, 4 pipelined pops, 5 interrupt mode.
F_INDIRECT, F_EVENT_IDX, REVERSE, PIPELINED, INTERRUPTS = 1, 2, 1 << 2, 1 << 4, 1 << 5


def desc(addr, length, buf_id, flags):
    return struct.pack("<QIHH", BASE + addr, length, buf_id, flags)


def avail(wrap):
    return AVAIL if wrap else USED


class Ring:
    def __init__(self, size, start=0, wrap=True):
        self.size, self.pos, self.wrap = size, start, wrap
        self.mem = bytearray(0x3400)

    def put(self, pos, blob):
        self.mem[16 * pos:16 * pos + 16] = blob

    def add(self, buf_id, elems):
        """elems: (addr, len, flags) with flags WRITE/INDIRECT; NEXT and the wrap bits added."""
        for i, (addr, length, flags) in enumerate(elems):
            last = i + 1 == len(elems)
            f = flags | avail(self.wrap) | (0 if last else NEXT)
            self.put(self.pos, desc(addr, length, buf_id if last else 0, f))
            self.pos += 1
            if self.pos == self.size:
                self.pos, self.wrap = 0, not self.wrap


def seed(name, ring, flags, start=0x8000, extra=()):
    for off, blob in extra:
        ring.mem[off:off + len(blob)] = blob
    ctl = bytes([ring.size - 1, flags]) + struct.pack("<H", start)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(ctl + bytes(ring.mem))


def main():
    os.makedirs(HERE, exist_ok=True)
    blk_read = [(DATA, 16, 0), (DATA + 0x100, 512, WRITE), (DATA + 0x400, 1, WRITE)]

    r = Ring(8)
    r.add(0, blk_read)
    r.add(1, [(DATA + 0x500, 16, 0), (DATA + 0x600, 1, WRITE)])
    r.add(2, [(DATA + 0x700, 8, WRITE)])
    seed("direct_three_lists", r, REVERSE)

    r = Ring(5, start=3)
    r.add(4, blk_read)
    r.add(1, [(DATA + 0x700, 8, WRITE)])
    seed("list_wraps_around", r, 0, start=0x8003)

    r = Ring(6, start=4, wrap=False)
    r.add(3, blk_read)
    seed("second_lap", r, 2 << 2, start=0x0004)

    table = b"".join(desc(a, n, 0, f) for a, n, f in blk_read)
    r = Ring(16)
    r.add(7, [(TABLES, len(table), INDIRECT)])
    r.add(8, blk_read)
    seed("indirect_then_direct", r, F_INDIRECT, extra=[(TABLES, table)])

    r = Ring(64)
    for k in range(24):
        r.add(k, [(DATA + 0x10 * k, 16, 0), (DATA + 0x800 + k, 1, WRITE)])
    seed("pipelined_batch", r, PIPELINED | REVERSE)

    r = Ring(8)
    r.add(0, [(DATA, 1, WRITE)])
    r.add(1, [(DATA + 1, 1, WRITE)])
    # Driver event suppression: DESC at position 1, wrap counter 1.
    event = struct.pack("<HH", 0x8001, 2)
    seed("event_idx_desc", r, F_EVENT_IDX | INTERRUPTS, extra=[(DRIVER_EVENT, event)])

    r = Ring(8)
    r.add(0, [(DATA, 1, WRITE)])
    r.add(9, [(DATA + 1, 1, WRITE)])  # buffer ID outside the queue
    r.add(2, [(DATA + 2, 1, WRITE)])
    seed("buffer_id_out_of_range", r, 0)

    r = Ring(8)
    r.add(0, [(DATA, 1, WRITE)])
    # A list whose second descriptor is not available yet.
    r.put(1, desc(DATA, 16, 0, AVAIL | NEXT))
    seed("partial_list", r, 0)


if __name__ == "__main__":
    main()
