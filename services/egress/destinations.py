"""Which resolved MX addresses the egress may connect to (SSRF guard, SECURITY.md "Egress destinations").

A persona chooses the recipient domain, and whoever runs that domain's DNS chooses the
addresses its MX names resolve to. Without this check an MX of 127.0.0.1, 10.0.0.5 or
169.254.169.254 would make the relay open SMTP connections inside its own network (to Redis,
a metadata service, an internal mail server that trusts the cluster). So after resolution only
globally reachable unicast addresses are allowed; `egress.routes` (an operator's choice, not
DNS's) and `egress.allowPrivateDestinations` (a private deployment, tests) lift the rule.

`ipaddress.is_global` alone is not enough on the Python versions we support: it calls
multicast global, and knows nothing of addresses that carry an IPv4 address inside IPv6
(IPv4-mapped, IPv4-compatible, 6to4, NAT64), through which 127.0.0.1 can be spelled as a
"global" IPv6 address. Each embedded IPv4 address must pass the same test.
"""

from __future__ import annotations

import ipaddress

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Special-purpose ranges (IANA registries) that some Python versions' `is_global` misses.
_NOT_GLOBAL = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # CGNAT shared address space (RFC 6598)
        "192.0.0.0/24",  # IETF protocol assignments
        "::/96",  # IPv4-compatible IPv6 (deprecated, RFC 4291): ::127.0.0.1
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs (RFC 9602)
    )
)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are IPv4


def destination_allowed(address: str) -> bool:
    """True when `address` (an IP literal from DNS) is a globally reachable unicast address,
    and so is every IPv4 address embedded in it. Anything that does not parse is refused."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a zone id means link-local anyway
    except ValueError:
        return False
    return all(_is_public(candidate) for candidate in _with_embedded(ip))


def _with_embedded(ip: IpAddress) -> list[IpAddress]:
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    found: list[IpAddress] = [ip]
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64_WELL_KNOWN:  # the IPv6 wrapper is global (it lies in reserved ::/8): only the IPv4 counts
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return found


def _is_public(ip: IpAddress) -> bool:
    if not ip.is_global:
        return False
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return not any(ip.version == network.version and ip in network for network in _NOT_GLOBAL)
