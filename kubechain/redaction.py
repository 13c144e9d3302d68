"""Cutting secret values out of text that leaves the worker (statuses, Events, logs, the LLM's context)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

# Values shorter than this are left: replacing a "1" or a "true" everywhere would garble the text.
MIN_SCRUBBED_CHARS = 6
REDACTED = "***"


# A run of the characters keys and tokens are written in (base64, base64url, hex), and one of letters and
# digits only; see looks_like_credential.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_-]{16,}")
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{16,}")
# a setting named as a secret, its value on the same line ("password: ...", "API_KEY=...", "secretKey: ...")
_SECRET_NAME = r"(?i)(passw(or)?d|passphrase|secret([-_]?(access[-_]?)?key)?|token|(api|private)[-_]?key)"
_SECRET_SETTING = re.compile(_SECRET_NAME + r"[\"']?\s*[:=]\s*\S")
# a JSON key naming a secret ("password", "client_secret")
_SECRET_KEY = re.compile(_SECRET_NAME + "$")
_PEM_MARKER = re.compile(r"-----(BEGIN|END) [A-Z0-9 ]*-----")
# a line that sets a value: "name: value", "NAME=value", "export NAME=value", '"name": "value",' (YAML, a
# .env file, a shell's, JSON); the value taken greedily, a JSON line's "," cut off after (a lazy value
# before "\s*,?" is quadratic in spaces)
_SETTING_LINE = re.compile(r"""(export\s+)?-?\s*["']?[\w.-]+["']?\s*[:=]\s*(?P<value>.+)""")
# a URL with a password ("postgres://app:pa55@db/orders", "redis://:pa55@redis"; not "https://git@github.com")
_URL_PASSWORD = re.compile(r"://[^/\s:@]*:[^/\s@]+@")
# a value that is a URL ("https://...", "postgres://...")
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# the words a camelCase or PascalCase name comes apart into: capitalised or small ("Cluster", "first"), or
# capitals (an acronym: "TLS" of "TLSConfig")
_NAME_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
_VOWELS = frozenset("aeiouyAEIOUY")
# one word or identifier ("postgres", "orders-db", "v1.2")
_PLAIN_WORD = re.compile(r"[\w.-]+")
# a word, or a name of words ("default", "minioadmin", "my-secret", "change_me"): letters only, "-" or "_"
# between them; up to _WORD_CHARS long (the defaults of charts and docs, "kubernetes", "supersecret", are
# up to 11; "correcthorsebattery" is a passphrase)
_WORD = re.compile(r"[^\W\d_]+([-_][^\W\d_]+)*")
_WORD_CHARS = 12


def looks_like_credential(text: str) -> bool:
    """Whether ``text`` holds what looks like a key, a token or a password rather than words: a run of 16
    base64 or base64url characters with capitals and small letters, and digits (a key, a certificate, a
    JWT: a camelCase name has no digits, "v1beta1" no capitals) or letters that do not come apart into
    words (see ``_not_words``); 16 letters and digits unbroken, both present (hex, an access key id: a
    name's words come apart at "-", "_" or "/"); a setting named as a secret; or a URL with a password.
    A random run of 16 is taken for a name 1 time in 50 (no digit, and in words by chance), of 24 1 in
    450."""
    return (
        any(_mixes_cases(run) and (_has_digits(run) or _not_words(run)) for run in _TOKEN_RUN.findall(text))
        or any(not run.isdigit() and not run.isalpha() for run in _ALNUM_RUN.findall(text))
        or _SECRET_SETTING.search(text) is not None
        or _URL_PASSWORD.search(text) is not None
    )


def _mixes_cases(run: str) -> bool:
    return any(c.isupper() for c in run) and any(c.islower() for c in run)


def _has_digits(run: str) -> bool:
    return any(c.isdigit() for c in run)


def _not_words(run: str) -> bool:
    """Whether two of the pieces ``run`` comes apart into as a camelCase name would ("Kcd", "Qw" of
    "xKcdQwEr") have no vowel and are not acronyms: a name's pieces are words ("ClusterFirstWithHostNet")
    or acronyms ("TLSConfig"). A name of abbreviations ("httpHeaderNameFmt") is taken for a key."""
    words = _NAME_WORD.findall(run)
    return sum(1 for word in words if not word.isupper() and _VOWELS.isdisjoint(word)) >= 2


def _credential_lines(value: str) -> set[str]:
    """The lines of a multi-line value (a kubeconfig, a PEM key, a service-account JSON) that are
    credentials on their own: the body of a PEM block, and lines that look like one, with the value
    each sets (see ``_set_credential``). Its other lines ("apiVersion: v1", "name: default", a PEM
    marker) are in every YAML, JSON or PEM text."""
    lines: set[str] = set()
    in_pem = False
    for line in (line.strip() for line in value.splitlines()):
        if _PEM_MARKER.fullmatch(line):
            in_pem = line.startswith("-----BEGIN")
        elif in_pem:
            lines.add(line)
        elif looks_like_credential(line):
            lines.add(line)
            lines.update(_set_credential(line))
    return lines


def _set_credential(line: str) -> set[str]:
    """The credentials a setting line sets (see ``_settings``), as text quotes them alone (a server says
    which token, which key it uses, not where it read it): each value, unquoted, if it holds a
    credential (see ``_holds_credential``), or if its setting is named as a secret ("password:
    correcthorsebattery") and the value is no word (see ``_is_word``: "POSTGRES_PASSWORD=postgres",
    "REDIS_PASSWORD=default": cut out of every text, they garble it; the line is cut out, whatever its
    value); the password of a URL it sets, unescaped, if no word either (a failed login quotes it); and
    of a value that spans lines once unescaped (a PEM key in a JSON string), its lines that are
    credentials too."""
    taken: set[str] = set()
    for value, named_as_secret in _settings(line):
        if _holds_credential(value) or (named_as_secret and not _is_word(value)):
            taken.update({value, *_credential_lines(value)} if "\n" in value else {value})
        password = _url_password(value)
        if password and (looks_like_credential(password) or not _is_word(password)):
            taken.add(password)
    return taken


def _settings(line: str) -> list[tuple[str, bool]]:
    """The values a line sets, unquoted, each with whether its setting is named as a secret: of a JSON
    line, whole ('{"auths": {...}}', a docker config) or a piece of an object ('"user": "bot", "password":
    "..."'), each string, under the key that holds it; otherwise the value of a "name: value" line."""
    if line.startswith(("{", '"')):
        members = line.removesuffix(",")  # "," after all members of an object but its last
        try:
            parsed = json.loads(members if line.startswith("{") else f"{{{members}}}")
            return list(_json_strings(parsed, named_as_secret=False))
        except (ValueError, RecursionError):  # a line of an object spread over lines ('"key": {'), no JSON
            pass
    setting = _SETTING_LINE.fullmatch(line)
    if setting is None:
        return []
    value = setting["value"].removesuffix(",").rstrip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        try:
            value = json.loads(value) if value[0] == '"' else value[1:-1]
        except ValueError:
            value = value[1:-1]
    return [(value, _SECRET_SETTING.search(line) is not None)] if isinstance(value, str) else []


def _json_strings(node: object, named_as_secret: bool) -> Iterator[tuple[str, bool]]:
    """The strings of a JSON value, each with whether the key that holds it (an item of a list: the
    list's) is named as a secret."""
    if isinstance(node, dict):
        for key, item in node.items():
            yield from _json_strings(item, _SECRET_KEY.search(key) is not None)
    elif isinstance(node, list):
        for item in node:
            yield from _json_strings(item, named_as_secret)
    elif isinstance(node, str):
        yield node, named_as_secret


def _holds_credential(value: str) -> bool:
    """Whether the value a setting sets looks like a credential (see ``looks_like_credential``) where it
    may hold one: of a URL, its user and password, its path's segments, its query and its fragment, not
    its host (an EKS cluster's is 32 hex digits, and "kubectl cluster-info" says it); of a path
    ("/api/v1/usrMgmt/pwdRst"), its segments one at a time (a key in a webhook's path is one)."""
    if _URL_START.match(value):
        try:
            url = urlsplit(value)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            return looks_like_credential(value)
        # "+" is a space in a query only; a setting named as a secret there: "?token=", "#access_token="
        after_path = unquote_plus(f"{url.query}#{url.fragment}")
        # the names and values of a query apart ("resourceVersion=12345678" is no key)
        pieces = [
            *(unquote(piece) for piece in (url.username or "", *url.path.split("/"))),
            *re.split(r"[&=;#]", after_path),
        ]
        return (
            _URL_PASSWORD.search(value) is not None
            or _SECRET_SETTING.search(after_path) is not None
            or any(looks_like_credential(piece) for piece in pieces if piece)
        )
    if value.startswith("/"):
        return any(looks_like_credential(segment) for segment in value.split("/") if segment)
    return looks_like_credential(value)


def _url_password(value: str) -> str | None:
    """The password of the URL ``value`` is, unescaped ("p%40ss" of "redis://:p%40ss@redis" is "p@ss")."""
    if _URL_PASSWORD.search(value) is None:
        return None
    try:
        password = urlsplit(value).password
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    return unquote(password) if password else None


def _is_word(value: str) -> bool:
    """Whether ``value`` is a word or a name of words, which any text may hold ("postgres", "default",
    "my-secret"): see ``_WORD``. A digit or a sign in it ("hunter2", "p@ssword"), or more than
    ``_WORD_CHARS``, and it is a password."""
    return len(value) <= _WORD_CHARS and _WORD.fullmatch(value) is not None


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """The ways the secret values may show in text, longest first: each value as it is and stripped and,
    for a multi-line value (a PEM key, a service-account JSON, a kubeconfig), each of its lines that
    carries a credential and the credential it sets (see ``_credential_lines``), since text is often
    scrubbed a line at a time (a child's stderr) and quotes a credential alone; each of these as it is,
    escaped inside a JSON or Python string literal (an error quoting a body or a dict), and, if on one
    line and holding none of the others, percent-encoded (see ``_percent_encoded``: a URL or a form body
    echoed in an error). Forms shorter than MIN_SCRUBBED_CHARS are left out."""
    forms: set[str] = set()
    for value in secrets:
        texts = {value, value.strip(), *_credential_lines(value)}
        for text in texts:
            forms.update(
                (
                    text,
                    json.dumps(text)[1:-1],
                    json.dumps(text, ensure_ascii=False)[1:-1],
                    repr(text)[1:-1],
                )
            )
            # Not a multi-line value whole: its credential lines are, and what is left out before a
            # long text's cut is the longest form (see scrub_then_cut), which percent-encoding makes
            # up to three times as long (a 40 KB JSON config: 75 KB, more than a long stderr line keeps).
            # Nor a text that holds another (a line, the credential it sets): percent-encoding escapes a
            # character at a time, so that one's forms cut it out of this one's, and each form holding
            # a "%" is looked for in every text that has one.
            if len(text.splitlines()) <= 1 and not any(
                len(other) >= MIN_SCRUBBED_CHARS and other != text and other in text for other in texts
            ):
                forms.update(_percent_encoded(text))
    return sorted((form for form in forms if len(form) >= MIN_SCRUBBED_CHARS), key=len, reverse=True)


def _percent_encoded(value: str) -> set[str]:
    """``value`` as it shows in a URL or a form body: every character but letters, digits and "_.-~"
    escaped, a space as ``%20`` or as ``+`` (a query's value, as httpx and urlencode write it), or but
    those that encoders leave too (see ``_LEFT_BY_ENCODERS``); the escapes' hex in capitals, as Python,
    httpx, Go and JavaScript write it, or in small letters, as others do. Only ``value`` itself when
    nothing needs escaping."""
    # surrogatepass: a lone surrogate is no UTF-8 (a JSON string may escape one); strict would raise
    encoded = {quote(value, safe=left, errors="surrogatepass") for left in _LEFT_BY_ENCODERS}
    encoded.add(quote(value, safe="", errors="surrogatepass").replace("%20", "+"))
    return encoded | {_small_hex(form) for form in encoded if "%" in form}


# What encoders leave unescaped besides letters, digits and "_.-~": a query's value (Python's quote with
# safe="", httpx), a path (Python's quote), JavaScript's encodeURIComponent and encodeURI (a whole URL), Go's
# url.PathEscape (a path's segment) and a Go URL's path.
_LEFT_BY_ENCODERS = ("", "/", "!'()*", "!#$&'()*+,/:;=?@", "$&+:=@", "$&+,/:;=@")


def _small_hex(encoded: str) -> str:
    """``encoded`` with the hex of its escapes in small letters (``%2F`` → ``%2f``): each "%" starts one."""
    first, *escaped = encoded.split("%")
    return "%".join([first, *(rest[:2].lower() + rest[2:] for rest in escaped)])


class Scrubber:
    """Cuts a fixed set of secret values out of text, as ``redact`` does, with their forms worked out once:
    that costs more than scrubbing a short line, and an MCP server's every answer and stderr line is
    scrubbed."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.forms: tuple[str, ...] = tuple(secret_forms(secrets))
        # how much of a text read only in part may be the start of a secret (see scrub_then_cut)
        self.longest = len(self.forms[0]) if self.forms else 0
        # Most text has no "%", and so none of the percent-encoded forms: they are not looked for in it.
        # (Longest first still: a longer form may hold a shorter one.)
        self._forms_without_percent = tuple(form for form in self.forms if "%" not in form)

    def __call__(self, text: str) -> str:
        for form in self.forms if "%" in text else self._forms_without_percent:
            text = text.replace(form, REDACTED)
        return text

    @functools.cached_property
    def _unnamable_forms(self) -> tuple[str, ...]:
        # only tool lists ask (in_name); a one-off redact() or an externalAPI call would pay for nothing
        return tuple(form for form in self.forms if _unnamable(form))

    def in_name(self, name: str) -> bool:
        """Whether ``name`` holds a secret that rules it out as a name (a tool's, a property's: what the
        LLM sends back, and which, cut, would name nothing on the server; two cut alike would be one): see
        ``_unnamable``."""
        return any(form in name for form in self._unnamable_forms)


def _unnamable(form: str) -> bool:
    """A secret's form that no name may hold: one that looks like a credential (see
    ``looks_like_credential``) or is more than a word ("postgres://app:pw@db", "pa55!"). A name that holds
    a single word or identifier ("postgres", a database user) holds it by coincidence: it is kept whole."""
    return looks_like_credential(form) or _PLAIN_WORD.fullmatch(form) is None


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of every secret value (see ``secret_forms``) replaced by ``***``. For a
    one-off text (an error); texts scrubbed of the same secrets again and again take a ``Scrubber``."""
    return Scrubber(secrets)(text)


def scrub_then_cut(text: str, scrub: Callable[[str], str], limit: int, *, margin: int = 0) -> str:
    """At most ``limit`` characters of ``scrub(text)``: scrubbed before the cut, which could leave the start
    of a secret that no later scrubbing recognises.

    ``margin``: ``text`` was read only in part (a body or a line up to a limit), so it may end inside a
    secret, which ``scrub`` leaves; pass the length of the longest secret form. What could come from its
    last ``margin`` characters is left out as well. ``scrub`` only shortens text (``***`` for six characters
    or more), so ``scrubbed[:len(scrubbed) - margin]`` comes from before them, where any secret is whole."""
    scrubbed = scrub(text)
    return scrubbed[: max(0, min(limit, len(scrubbed) - margin))]


def redact_url(url: str) -> str:
    """The URL without userinfo (``https://user:token@host`` → ``https://host``) and without the values of
    its query (``?api_key=abc`` → ``?api_key=***``, whatever the names: APIs take keys, tokens and signatures
    there). A password written with "/", "?" or "#" unescaped is cut out whole: see ``_without_userinfo``."""
    url = _without_userinfo(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: up to the host only, which is what is wrong
        scheme, slashes, rest = url.partition("//")
        return scheme + slashes + re.split(r"[/?#]", rest, maxsplit=1)[0]
    query = "&".join(
        f"{name}=***" if sep else name
        for name, sep, _ in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit(parts._replace(query=query))


# "scheme://" (or "//" alone): what starts a URL with an authority ([userinfo@]host[:port])
_AUTHORITY_START = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?//")
# Schemes whose URLs may hold an "@" after the host, in a path ("/models/claude@20241022", "/@user"), a
# query ("?email=a@b.example") or a fragment. Of the others (redis://, postgres://, amqp://) an "@" is
# the userinfo's end wherever it is.
_AT_AFTER_HOST = frozenset({"http", "https", "ws", "wss"})
# a host no userinfo is taken for: a name with a dot (an IPv4 address too), localhost or an IP literal,
# with a port of digits if any
_NAMED_HOST = re.compile(
    r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\.?|localhost|\[[0-9A-Fa-f:.]+(?:%25[\w.~-]+)?\])(?::[0-9]+)?",
    re.IGNORECASE,
)


def _without_userinfo(url: str) -> str:
    """``url`` without its userinfo: all that comes before the host and its "@".

    A password (or a token given as the user) written with "/", "?" or "#" unescaped ends the host's part
    for urlsplit, which reads ``redis://:s3cr/et@127.0.0.1:1/0`` as host "", port "s3cr", path
    "/et@127.0.0.1:1/0": the userinfo ends at the *last* "@" then. Except that an http(s) URL's path, query
    or fragment may hold an "@" of its own ("/models/claude@20241022", "?email=a@b.example"): of such a URL,
    when the part up to its first "/", "?" or "#" (after an "@" there) is a host no userinfo is taken for
    (see ``_NAMED_HOST``), the "@" after it are the URL's. A one-label host ("https://host/x?e=a@b") is
    read as a user with a "/" in its password instead ("https://b"), which shows less, never a password.
    What this still shows is the start of a password with "/", "?" or "#" whose user has a dot in it and
    whose start is a port of digits ("https://first.last:1234/x@host"): read either way."""
    start = _AUTHORITY_START.match(url)
    if start is None:
        return url  # no authority: no userinfo either ("mailto:a@b", "unix:///run/redis.sock")
    prefix, rest = url[: start.end()], url[start.end() :]
    if "@" not in rest:
        return url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    scheme = prefix[: -len("://")].lower()
    if scheme in _AT_AFTER_HOST and _NAMED_HOST.fullmatch(authority.rpartition("@")[2]):
        return prefix + rest[len(authority.rpartition("@")[0]) + 1 :] if "@" in authority else url
    return prefix + rest.rpartition("@")[2]
