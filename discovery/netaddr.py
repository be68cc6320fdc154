"""Which of our IPv4 addresses to announce, given the address the node binds to."""

from __future__ import annotations

import ipaddress

import ifaddr

WILDCARDS = ("", "0.0.0.0")


def announce_ips(host_ip: str) -> list[str]:
    """host_ip itself, or for a wildcard bind every non-loopback IPv4 address (loopback if none)."""
    if host_ip not in WILDCARDS:
        return [host_ip]
    ips = sorted(
        {
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if ip.is_IPv4 and not ipaddress.IPv4Address(ip.ip).is_loopback
        }
    )
    return ips or ["127.0.0.1"]


def port_of(hostport: str) -> int:
    """The port of "host:port", 0 when there is none (a peer-supplied address: never raises)."""
    try:
        return int(hostport.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0
