"""Who may use `librarian serve`: its own page and its clients, not any web page the user happens to open.

Three checks, on every request, before any other work (librarian/inference/server.py runs them as
a middleware):

- Host (421): DNS rebinding points a name the attacker owns at 127.0.0.1, so a page of theirs can
  read the replies of a server that has no key; its requests then carry the attacker's name in
  Host. Accepted: any IP address (a browser connects to an address it was given as such and sends
  it unchanged: DNS cannot rebind it), `localhost`, the name --host gave, this machine's own name
  when the server listens on every interface (0.0.0.0 or ::), and the names of --allow-host
  (`*`: any).
- Origin (403): a browser names the page behind a script's request in Origin. Accepted: none (a
  client that is not a browser), the server's own (the page at / : Origin's host and port are
  the Host header's), and those of --allow-origin (`*`: any).
- Content-Type (415): a page may POST `text/plain` or a bare body to another site without asking
  first (a "simple" request: no CORS preflight); the API reads JSON only, so it says so.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})
ANY = "*"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_PORTS = {"http": "80", "https": "443"}


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str


def split_host(value: str) -> tuple[str, str]:
    """(host, port) of a Host header or an origin's netloc: lowercase, no brackets, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        host, _, rest = value[1:].partition("]")
        return host, rest.removeprefix(":")
    if value.count(":") > 1:  # a bare IPv6 address has no port
        return value, ""
    host, _, port = value.partition(":")
    return host.rstrip("."), port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normal_origin(origin: str) -> str:
    """scheme://host:port, lowercase, the default port written out: two spellings of one origin compare equal."""
    parts = urlsplit(origin.strip().lower())
    host, port = split_host(parts.netloc)
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORTS.get(parts.scheme, '')}"


def check_origin_flag(origin: str) -> str:
    """An --allow-origin value as given, or ValueError saying what an origin looks like."""
    parts = urlsplit(origin.strip())
    if origin.strip() == ANY or (parts.scheme in DEFAULT_PORTS and parts.netloc and parts.path in ("", "/")
                                 and not parts.query and not parts.fragment):
        return origin.strip()
    raise ValueError(f"--allow-origin wants an origin: a scheme, a host and a port, like http://localhost:3000 "
                     f"(or * for any), got {origin!r}")


def check_host_flag(name: str) -> str:
    """An --allow-host value as given, or ValueError saying what a host name looks like."""
    host, port = split_host(name)
    if name.strip() == ANY or (host and not port and "/" not in host and " " not in host):
        return name.strip()
    raise ValueError(f"--allow-host wants a host name, like my-box.lan (no scheme, no port; * for any), got {name!r}")


@dataclass(frozen=True)
class Access:
    """The Host names and page origins a server accepts, from where it listens and what the user allowed."""

    hosts: frozenset[str]
    origins: frozenset[str]

    @classmethod
    def of(cls, listen: str, allow_hosts: Iterable[str] = (), allow_origins: Iterable[str] = ()) -> "Access":
        hosts = {split_host(h)[0] if h != ANY else ANY for h in allow_hosts} | LOOPBACK_NAMES
        listen = split_host(listen)[0]
        if listen in ("", "0.0.0.0", "::"):  # every interface: the machine is reached by its own name too
            hosts.add(socket.gethostname().lower())
        elif not is_ip(listen):
            hosts.add(listen)
        origins = {o.strip() if o.strip() == ANY else normal_origin(o) for o in allow_origins}
        return cls(frozenset(hosts), frozenset(origins))

    def refusal(self, method: str, headers) -> Refusal | None:
        """Why a request with this method and these headers (a Mapping, case-insensitive) is refused, or None."""
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            name = split_host(host)[0][:100]
            return Refusal(421, f"the Host header names {name!r}, which is not a name of this server (a web page may "
                                "be trying to reach it by DNS rebinding); if you reach the server by that name, start "
                                f"it with --allow-host {name}", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            origin = origin.strip()[:200]
            return Refusal(403, f"requests from the web page at {origin} are refused (the Origin header); start the "
                                f"server with --allow-origin {origin} to let that page use it", "origin_not_allowed")
        if method in BODY_METHODS:
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                given = f"is {kind}" if kind else "has no Content-Type"
                return Refusal(415, f"the request body {given}; send JSON with the header "
                                    "`Content-Type: application/json`", "unsupported_media_type")
        return None

    def host_allowed(self, header: str) -> bool:
        host = split_host(header)[0]
        return ANY in self.hosts or host in self.hosts or is_ip(host)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        if ANY in self.origins:
            return True
        if origin.strip().lower() == "null":  # a sandboxed frame or a local file: never our page
            return False
        own = normal_origin(origin)
        if own in self.origins:
            return True
        # The page's origin is this server's own when its host and port are those the request was sent to.
        scheme = urlsplit(own).scheme
        return host is not None and own == normal_origin(f"{scheme}://{host}")
