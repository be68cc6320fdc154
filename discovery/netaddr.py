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


def on_link_networks(ips: list[str]) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks our announced addresses sit on: the only hosts a LAN pointer may name."""
    wanted = set(ips)
    nets = {
        ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}").network
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and ip.ip in wanted
    }
    if any(ipaddress.IPv4Address(ip).is_loopback for ip in ips):
        nets.add(ipaddress.IPv4Network("127.0.0.0/8"))
    return sorted(nets)


def in_networks(host: str, nets: list[ipaddress.IPv4Network]) -> bool:
    try:
        addr = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(addr in net for net in nets)
