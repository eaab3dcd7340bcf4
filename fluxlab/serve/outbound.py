"""Where the server may send requests (webhooks, input URLs it fetches): never to its own machine or network unless
the operator says so.

A URL's host is resolved and every address it resolves to is checked, since the string tells nothing
(`2130706433`, `0x7f.1`, `127.1` and `[::ffff:127.0.0.1]` are all loopback). Refused by default: loopback,
private, link-local (cloud metadata at 169.254.169.254), multicast, reserved, unspecified and shared (CGNAT)
addresses, in IPv4, IPv6 and IPv4-mapped forms. `--webhook-allow CIDR|HOST` opens what an operator needs. The
check runs when a job is created (a 422 naming the field) and again before each delivery, which then connects to
the address it checked, so a name that resolves elsewhere the second time cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import UserError


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def internal(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return internal(addr.ipv4_mapped)
    if isinstance(addr, ipaddress.IPv6Address) and addr.sixtofour is not None:
        return internal(addr.sixtofour)
    return (addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_multicast or addr.is_reserved
            or addr.is_unspecified or not addr.is_global)


@dataclass(frozen=True)
class Policy:
    """Which internal addresses and hosts are allowed anyway (from --webhook-allow)."""

    networks: tuple = ()
    hosts: tuple = ()

    @classmethod
    def parse(cls, items) -> Policy:
        networks, hosts = [], []
        for item in items or ():
            text = str(item).strip().lower()
            try:
                networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not text or any(c in text for c in "/:@ ") or text.startswith("."):
                raise UserError(f"--webhook-allow {item!r}: give an address, a network (10.0.0.0/8) or a host name")
            hosts.append(text)
        return cls(tuple(networks), tuple(hosts))

    def allows(self, addr) -> bool:
        return any(addr in net for net in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked URL: the address to connect to, and what to say to it (Host header, TLS name)."""

    url: str  # with the checked address in place of the name
    host: str
    sni: str | None


def check(url: str, policy: Policy, field: str = "webhook", resolve=system_resolve) -> Target:
    """The URL's target, or a UserError naming `field` and why it is refused."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise UserError(f"{field}: {url[:100]!r} is not a valid URL ({e})") from None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise UserError(f"{field}: {url[:100]!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise UserError(f"{field}: {url[:100]!r} carries a user name or password; put secrets elsewhere")
    try:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host, port)]
    except (OSError, UnicodeError, ValueError) as e:
        raise UserError(f"{field}: the host {host!r} does not resolve ({e})") from None
    if not addresses:
        raise UserError(f"{field}: the host {host!r} does not resolve")
    named = host.lower() in policy.hosts
    for addr in addresses:
        if internal(addr) and not named and not policy.allows(addr):
            raise UserError(f"{field}: {host!r} resolves to {addr}, an internal address; the server sends requests "
                            f"(webhooks, input URLs) to public addresses only unless started with --webhook-allow")
    addr = addresses[0]
    netloc = f"[{addr}]" if addr.version == 6 else str(addr)
    netloc += f":{parts.port}" if parts.port else ""
    pinned = parts._replace(netloc=netloc).geturl()
    host_header = parts.netloc.rpartition("@")[2]
    return Target(pinned, host_header, host if parts.scheme == "https" else None)


def download(url: str, policy: Policy, field: str, out, limit: int, resolve=system_resolve) -> str:
    """GET a checked URL into the open binary file `out`, at most `limit` bytes, no redirects; its file name.
    A refused address, an error status or a body over the limit is a UserError naming `field`."""
    import httpx

    target = check(url, policy, field, resolve)
    size = 0
    try:
        with httpx.Client(timeout=httpx.Timeout(60, connect=10), follow_redirects=False, trust_env=False) as client, \
                client.stream("GET", target.url, headers={"Host": target.host},
                              extensions={"sni_hostname": target.sni} if target.sni else {}) as r:
            if r.status_code != 200:
                raise UserError(f"{field}: GET {url[:100]} answered {r.status_code}, not 200 with the file")
            for chunk in r.iter_bytes(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise UserError(f"{field}: {url[:100]} is over the {limit // 2**20} MB limit")
                out.write(chunk)
    except httpx.HTTPError as e:
        raise UserError(f"{field}: GET {url[:100]} failed ({type(e).__name__})") from None
    return urlsplit(url).path.rstrip("/").rpartition("/")[2] or "download"
