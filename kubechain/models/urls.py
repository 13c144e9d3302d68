"""Whether a URL in a spec (an LLM's baseUrl, an MCPServer's url, an externalAPI Tool's url) is one an HTTP
client can send requests to. Checked when the object is validated: each was found only when called, in
the client's words (httpx's "Request URL is missing an 'http://' or 'https://' protocol", a DNS error for a
host with a space in it), and an LLM's as if its API key were wrong."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# a URL's authority: after "scheme://", up to the first "/", "?" or "#" (as httpx and urlsplit read it)
_AUTHORITY = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://(?P<authority>[^/?#]*)")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
HTTP_SCHEMES = ("http", "https")


def url_has_userinfo(url: str) -> bool:
    """Whether ``url`` has userinfo (``user:password@``, or a token as the user) before its host: an HTTP
    client sends it as Basic auth, and the spec is read by whoever may read the object."""
    found = _AUTHORITY.match(url)
    return found is not None and "@" in found.group("authority")


def credentials_in_url(field: str, where_they_go: str) -> str:
    """Why a URL with userinfo is refused, without quoting it (it holds them): ``field`` is where the URL
    is, ``where_they_go`` what to do with the credentials instead."""
    return (
        f'{field} holds credentials ("user:password@" before its host), which are never sent: {where_they_go}'
    )


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host that a client can send requests to, or None. Said
    without quoting any of it but its scheme: its userinfo or query may hold credentials (a port that is no
    number may be a password's start). Userinfo is each caller's to refuse (see ``url_has_userinfo``), saying
    where credentials go for that kind of object."""
    unprintable = next((at for at, character in enumerate(url) if not character.isprintable()), None)
    if unprintable is not None:  # httpx refuses it (InvalidURL); a YAML block scalar ends in a line break
        return (
            "has a character that is not printable (a line break or a tab?) at character "
            f"{unprintable + 1}: remove it"
        )
    if url != url.strip():  # " https://host" is a relative URL to httpx
        return "starts or ends with a space: remove it"
    scheme, separator, rest = url.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme):
        return "has no scheme: start it with https:// or http://"
    if scheme.lower() not in HTTP_SCHEMES:
        return f"has scheme {scheme}://, not http:// or https://"
    if " " in re.split(r"[/?#]", rest, maxsplit=1)[0]:
        # (a space in a path or query is sent as %20: such URLs worked, and still do)
        return "has a space in its host: remove it"
    try:
        parts = urlsplit(url)
    except ValueError:  # urlsplit's only complaint: "Invalid IPv6 URL"
        return 'has an IPv6 host without its closing "]"'
    if not parts.hostname:
        return "has no host"
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        port = 0
    if port == 0:
        return "has a port that is no number from 1 to 65535"
    return None


def spec_url_problem(field: str, url: str, credentials_refused: str) -> str | None:
    """Why ``url``, the spec's ``field``, is not used, or None: ``credentials_refused`` (what the kind says
    of userinfo, and where credentials go instead) if it has userinfo, else what ``http_url_problem``
    finds, named by its field."""
    if url_has_userinfo(url):
        return credentials_refused
    problem = http_url_problem(url)
    return None if problem is None else f"{field} {problem}"
