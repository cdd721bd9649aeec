#!/usr/bin/env python3
"""Writes hand-made blk_decode inputs (compact mode) for requests the decoder accepts: a fuzzer
starting from nothing rarely finds a write whose data is a multiple of 512 bytes, or a well-formed
discard range list. scripts/fuzz-smoke.sh passes core/fuzz/seeds/<target>/ as an extra corpus."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blk_decode")
R, W = 0, 1


def seed(name, descs, req_type, sector, contents=b"", capacity=2048, discard=False, wz=False, ro=False):
    flags = 0x80 | (1 if ro else 0) | (2 if discard else 0) | (4 if wz else 0)
    ctl = struct.pack("<HBB", capacity, 0, flags)
    body = bytes([len(descs) - 1])
    for off, length, write in descs:
        body += struct.pack("<HHB", off, length, write)
    body += struct.pack("<IQ", req_type, sector)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(ctl + body + contents)


def ranges(*rs):
    return b"".join(struct.pack("<QII", s, n, fl) for s, n, fl in rs)


os.makedirs(HERE, exist_ok=True)
seed("read_4k", [(0, 16, R), (0x100, 4096, W), (0x2000, 1, W)], 0, 8)
seed("write_512", [(0, 16, R), (0x100, 512, R), (0x400, 1, W)], 1, 2047)
seed("write_split_header", [(0, 4, R), (4, 12 + 1024, R), (0x800, 1, W)], 1, 0)
seed("write_ro", [(0, 16, R), (0x100, 512, R), (0x400, 1, W)], 1, 0, ro=True)
seed("flush", [(0, 16, R), (0x400, 1, W)], 4, 0)
seed("get_id", [(0, 16, R), (0x100, 20, W), (0x400, 1, W)], 8, 0)
seed("discard_2", [(0, 16, R), (0x100, 32, R), (0x400, 1, W)], 11, 0,
     b"\0" * 0x100 + ranges((0, 8, 0), (16, 1024, 0)), discard=True)
seed("discard_split_range", [(0, 16, R), (0x100, 21, R), (0x115, 11, R), (0x400, 1, W)], 11, 0,
     b"\0" * 0x100 + ranges((0, 8, 0), (2040, 8, 0)), discard=True)
seed("write_zeroes_unmap", [(0, 16, R), (0x100, 16, R), (0x400, 1, W)], 13, 0,
     b"\0" * 0x100 + ranges((100, 900, 1)), wz=True)
seed("discard_too_long", [(0, 16, R), (0x100, 16, R), (0x400, 1, W)], 11, 0,
     b"\0" * 0x100 + ranges((0, 5000, 0)), discard=True)
