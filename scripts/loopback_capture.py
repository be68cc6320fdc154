"""Bytes on the loopback interface by kind (mDNS, advert multicast, advert fetches, libp2p), for
scripts/bench_discovery.py's measurements of discovery traffic between real node processes."""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.lan_multicast import PORT as MULTICAST_PORT  # noqa: E402


class LoopbackCapture:
    """Counts IPv4 bytes on `lo` with a raw packet socket (root), each packet once, by kind."""

    def __init__(self, http_ports: set[int], libp2p_ports: set[int]) -> None:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._http, self._libp2p = http_ports, libp2p_ports
        self.bytes = dict.fromkeys(("mdns", "advert_multicast", "advert_fetch", "libp2p", "other"), 0)
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.monotonic() - self.started
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65600)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING or len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue  # on lo every packet is seen twice (out and in): count the outgoing copy
            ip = frame[14:]
            total_len = struct.unpack("!H", ip[2:4])[0]
            ihl = (ip[0] & 0x0F) * 4
            proto = ip[9]
            sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
            ports = {sport, dport}
            if proto == 17 and 5353 in ports:
                kind = "mdns"
            elif proto == 17 and MULTICAST_PORT in ports:
                kind = "advert_multicast"
            elif proto == 6 and ports & self._http:
                kind = "advert_fetch"
            elif proto == 6 and ports & self._libp2p:
                kind = "libp2p"
            else:
                kind = "other"
            self.bytes[kind] += total_len
            self.packets += 1
