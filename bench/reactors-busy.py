#!/usr/bin/env python3
"""Prints a target's busy time so far in ns: framework_get_reactors' busy ticks over all its
reactors. rvhost and SPDK answer the same JSON-RPC method. With a PID, also prints that
process's user + system CPU time in ns ("busy_ns cpu_ns").

Usage: reactors-busy.py RPC_SOCKET [PID]   (bench/compare.sh, bench/packed-compare.sh)
"""
import json
import os
import socket
import sys


def reactors_busy_ns(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "framework_get_reactors"}).encode())
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("framework_get_reactors: connection closed")
        buf += chunk
        try:
            r = json.loads(buf)["result"]
            break
        except ValueError:
            continue
    return sum(x["busy"] for x in r["reactors"]) * 1e9 / r["tick_rate"]


def process_cpu_ns(pid):
    st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) * 1e9 / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    busy = reactors_busy_ns(sys.argv[1])
    if len(sys.argv) == 3:
        print("%.0f %.0f" % (busy, process_cpu_ns(sys.argv[2])))
    else:
        print("%.0f" % busy)
