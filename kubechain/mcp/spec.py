"""Checking an MCPServer spec and resolving it (secrets included) into what a connection needs. Pure."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kubechain.mcp.common import MCPError, UnusableSecret
from kubechain.models import MCPServer, MCPServerSpec
from kubechain.models.mcpserver import EnvVar
from kubechain.models.urls import credentials_in_url, spec_url_problem
from kubechain.redaction import Scrubber, redact_url

# resolve_secret(namespace, secret_name, key) -> value; raises with a message naming what is missing.
SecretResolver = Callable[[str, str, str], str]

ALLOWLIST_SETTING = "KUBECHAIN_MCP_COMMAND_ALLOWLIST"
# Why a server whose url has userinfo is not connected to: a client makes Basic auth of it, and whoever may
# read MCPServers reads the password.
CREDENTIALS_IN_URL = credentials_in_url(
    "url",
    "put them in a header (spec.headers), its value read from a Secret with valueFrom.secretKeyRef",
)


@dataclass(frozen=True)
class ResolvedSpec:
    """Everything that identifies one connection. ``env`` and ``headers`` may hold secret values: they are
    kept out of ``repr`` and must never be logged."""

    transport: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # the values read from Secrets (and a header's credential alone), to be cut out of any text that might
    # quote one
    secret_values: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @functools.cached_property
    def scrubber(self) -> Scrubber:
        """Cuts this spec's secret values out of text: made once, used for every answer and stderr line."""
        return Scrubber(self.secret_values)

    def scrub(self, text: str) -> str:
        """``text`` with every secret value of this spec replaced by ``***`` (see ``redact``)."""
        return self.scrubber(text)

    def fingerprint(self) -> str:
        """A digest of the whole spec: a different value means a different connection (reconnect)."""
        material = json.dumps(
            [self.transport, self.command, list(self.args), list(self.env), self.url, list(self.headers)],
            separators=(",", ":"),
        )
        return hashlib.sha256(material.encode()).hexdigest()

    def describe(self) -> str:
        """A log-safe description (no args, env, header values or URL credentials)."""
        if self.transport == "stdio":
            return f"stdio command {self.command!r}"
        return f"{self.transport} {redact_url(self.url or '')}"


def _var_problem(var: EnvVar, what: str) -> str | None:
    if not var.name:
        return f"{what} name must not be empty"
    if var.value_from is not None:
        if var.value_from.secret_key_ref is None:
            return f'{what} "{var.name}": valueFrom needs a secretKeyRef'
        if var.value:
            return f'{what} "{var.name}": set either value or valueFrom, not both'
    return None


def validate_spec(spec: MCPServerSpec) -> str | None:
    """Why the spec cannot work, or None (the original's messages where it had them)."""
    transport = spec.transport
    if transport not in ("stdio", "http", "sse"):
        return f"invalid server transport: {transport}"
    if transport == "stdio":
        if not spec.command:
            return "command is required for stdio servers"
        if problem := _process_problem(spec):
            return problem
    else:
        if not spec.url:
            return f"url is required for {transport} servers"
        if (problem := spec_url_problem("url", spec.url, CREDENTIALS_IN_URL)) is not None:
            return problem
    for var in spec.env or []:
        if problem := _var_problem(var, "env var"):
            return problem
    for header in spec.headers or []:
        if problem := _var_problem(header, "header"):
            return problem
        if transport != "stdio" and (problem := _header_problem(header, transport)):
            return problem
    return None


# The OS takes each string of a new process (its program, arguments, environment) NUL-terminated, and an
# environment entry's name ends at its first "=": subprocess raises ValueError, which read as a failed
# handshake, naming neither the field nor the value.
NUL_IN_ENV_VALUE = "contains a NUL character, which no environment variable can hold"


def _process_problem(spec: MCPServerSpec) -> str | None:
    """Why the stdio command cannot be started with its args and env (values written in the spec), or
    None. A Secret's value is looked at when it is read (``_resolve_vars``)."""
    command = spec.command or ""
    if command != command.strip():  # a YAML block scalar ends in a line break; no such program is found
        return "command starts or ends with a space or a line break: remove it"
    if "\0" in command:
        return "command contains a NUL character, which no program's name can hold; remove it"
    for at, arg in enumerate(spec.args or []):
        if "\0" in arg:
            return f"args[{at}] contains a NUL character, which no command-line argument can hold; remove it"
    for var in spec.env or []:
        name = var.name.replace("\0", "\\0")
        if "\0" in var.name:
            return (
                f'env var name "{name}" contains a NUL character, which no variable\'s name can hold; '
                "remove it"
            )
        if "=" in var.name:
            return (
                f'env var name "{name}" contains "=", which ends a variable\'s name: write its value in value'
            )
        if "\0" in (var.value or ""):
            return f'env var "{name}": its value {NUL_IN_ENV_VALUE}; remove it'
    return None


# What the HTTP client (h11, under httpx) sends as a header name: an RFC 9110 token. Anything else it
# refuses at every request, in words that quote it ("Illegal header name b'...'"), or fails to encode.
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


# Why a header contradicting the body is refused, each ending in the punctuation before what to do.
_SET_BY_THE_CLIENT = "is set by the HTTP client for each request, from its body:"
_NOT_JSON = (
    "is not application/json: the client posts every MCP message as JSON, and an SSE server refuses one "
    "said to be anything else;"
)


def _body_header_problem(name: str, value: str | None, transport: str) -> str | None:
    """What in header ``name`` contradicts the body the client sends, or None; ``value`` None: it is read
    from a Secret, and looked at when read (``_secret_body_header_problem``), so only its name is. The
    client frames each request's body itself: h11 refuses a Content-Length of the spec's (the body is longer
    or shorter) and any Transfer-Encoding but chunked. An SSE server refuses a message posted as anything
    but JSON, which the SDK only logs; the streamable-HTTP client sets its own Content-Type for each
    message."""
    name = name.lower()
    if name == "content-length":
        return _SET_BY_THE_CLIENT
    if value is None:
        return None
    value = value.strip().lower()
    if name == "transfer-encoding" and value != "chunked":
        return _SET_BY_THE_CLIENT
    if (
        name == "content-type"
        and transport == "sse"
        and value.partition(";")[0].strip() != "application/json"
    ):
        return _NOT_JSON
    return None


def _secret_body_header_problem(name: str, value: str, transport: str) -> str | None:
    """What in header ``name``, its ``value`` read from a Secret, contradicts the body the client sends,
    or None: ``_body_header_problem``'s rules, said as what the Secret may hold, never quoting it."""
    problem = _body_header_problem(name, value, transport)
    if problem is None:
        return None
    if name.lower() == "transfer-encoding":
        return (
            "is not chunked, the only Transfer-Encoding the HTTP client sends (it frames each request's "
            "body itself): store chunked"
        )
    if name.lower() == "content-type":
        return f"{problem} store application/json"
    return problem  # a Content-Length: validate_spec refuses it before any Secret is read


def _header_problem(header: EnvVar, transport: str) -> str | None:
    """Why no HTTP request can carry ``header`` (its name, or its value when written in the spec), or
    None. Said without quoting the value: it may be a credential."""
    if not _HEADER_NAME.fullmatch(header.name):
        at = next(i for i, char in enumerate(header.name) if not _HEADER_NAME.fullmatch(char))
        return (
            f'header name "{header.name}" has a character no header name may hold (character {at + 1}): '
            "a name is letters, digits and any of !#$%&'*+-.^_`|~, without spaces or a colon"
        )
    if header.value and (problem := _header_value_problem(header.value)):
        return f'header "{header.name}": its value contains {problem}; remove it'
    value = None if header.value_from is not None else header.value or ""
    if problem := _body_header_problem(header.name, value, transport):
        return f'header "{header.name}" {problem} remove it'
    return None


def command_problem(command: str, allowlist: Sequence[str] | None) -> str | None:
    """Why a stdio command may not run, or None. An empty allowlist allows everything; an entry without
    a slash matches the command's basename, an entry with one must equal the command."""
    if not allowlist:
        return None
    if command in allowlist or os.path.basename(command) in allowlist:
        return None
    return (
        f"stdio command '{command}' is not in the allowlist ({ALLOWLIST_SETTING}); "
        f"allowed: {', '.join(allowlist)}"
    )


# With a command allowlist, the variables a spec may not set, since they change what an allowed command
# runs, where it fetches it from or whom it trusts: (names, or prefixes ending in "_") -> why. Names are
# matched in their own case, as Linux and the programs reading them do (ld_preload, path or home are other
# variables); npm and yarn read their settings in any case. Without an allowlist any command may run.
_COMMAND_CHANGING_ENV: tuple[tuple[tuple[str, ...], str], ...] = (
    (("LD_", "DYLD_"), "it makes the dynamic loader load other code into the command"),
    (("GCONV_PATH", "LOCPATH"), "it makes the C library load other code or data"),
    (("PATH",), "it changes which program a command name runs"),
    (("NODE_OPTIONS", "NODE_PATH"), "it makes Node load other code"),
    (("npm_config_", "NPX_"), "it changes where npx or npm fetch packages from"),
    (("yarn_", "BUN_", "COREPACK_"), "it changes where yarn, bun or corepack fetch packages from"),
    (
        (
            "PYTHONPATH",
            "PYTHONHOME",
            "PYTHONSTARTUP",
            "PYTHONUSERBASE",
            "PYTHONPLATLIBDIR",
            "PYTHONEXECUTABLE",
            "PYTHONWARNINGS",  # a warning category names a module, which is imported
            "PYTHONBREAKPOINT",
            "PYTHONPYCACHEPREFIX",
            "PYTHONINSPECT",
        ),
        "it makes Python load other code",
    ),
    (("UV_",), "it changes where uvx fetches packages from, or which Python it runs"),
    (("PIP_",), "it changes where pip fetches packages from"),
    (("BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "BASH_FUNC_"), "it makes a shell run other code"),
    (
        ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH"),
        "it makes Java load other code",
    ),
    (("RUBYOPT", "RUBYLIB"), "it makes Ruby load other code"),
    (("PERL5OPT", "PERL5LIB", "PERLLIB"), "it makes Perl load other code"),
    (("GIT_",), "it changes what git runs or where it fetches from"),
    (
        ("HOME", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "XDG_DATA_HOME", "XDG_CACHE_HOME"),
        "it changes where the command reads its configuration and cached packages from",
    ),
    (
        (
            *("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"),
            *("http_proxy", "https_proxy", "all_proxy", "no_proxy"),
            "HOSTALIASES",
        ),
        "it changes where the command's network requests go",
    ),
    (
        (
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "NODE_EXTRA_CA_CERTS",
            "NODE_TLS_REJECT_UNAUTHORIZED",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
        ),
        "it changes which servers the command trusts",
    ),
)
# Read by their programs in any case (npm's config loader, yarn's): matched lower-cased.
_ANY_CASE_PREFIXES = ("npm_config_", "yarn_")
# Settings people put in MCP specs that change neither what runs nor where it comes from (npm's in any case).
_HARMLESS_ENV = frozenset({"npm_config_loglevel", "npm_config_yes", "UV_NO_PROGRESS", "GIT_TERMINAL_PROMPT"})


def _matches(name: str, variable: str) -> bool:
    if variable in _ANY_CASE_PREFIXES:
        return name.lower().startswith(variable)
    return name == variable or (variable.endswith("_") and name.startswith(variable))


def env_problem(names: Sequence[str], allowlist: Sequence[str] | None) -> str | None:
    """Why a stdio spec may not set one of the environment variables ``names``, or None. Only with an
    allowlist: the variables that would make an allowed command run something else (preload a library,
    find another program, load other code, fetch its package elsewhere or trust another server) are
    refused. This limits which programs start, not what they fetch: their arguments (``npx -c``, ``uvx
    --index-url``) are not looked at."""
    if not allowlist:
        return None
    for name in names:
        if name in _HARMLESS_ENV or name.lower() in _HARMLESS_ENV:
            continue
        for variables, why in _COMMAND_CHANGING_ENV:
            if any(_matches(name, variable) for variable in variables):
                return (
                    f'env var "{name}" may not be set while stdio commands are restricted '
                    f"({ALLOWLIST_SETTING}): {why}"
                )
    return None


def _header_value_problem(value: str) -> str | None:
    """What in a header value no HTTP request can carry, or None: a line break or another control
    character (h11 refuses some, servers the rest: HTTP 400), or a non-ASCII character (httpx encodes
    header values as ASCII; its UnicodeEncodeError names neither the header nor where the value came
    from), said by its position, never quoting the value. The spaces and line breaks around the value are
    not sent (see ``_resolve_vars``) and are not looked at."""
    start = len(value) - len(value.lstrip())
    for at, char in enumerate(value.strip(), start):
        if ord(char) < 32 and char != "\t" or ord(char) == 127:
            return "a line break or another control character"
        if not char.isascii():
            return f"a character an HTTP header cannot carry (character {at + 1}, not ASCII)"
    return None


def _credential_parts(header_value: str) -> list[str]:
    """What an error may quote of an ``Authorization``-style value on its own: the credential without its
    scheme ("Bearer <token>" → the token) and, for Basic, the decoded "user:password" and the password.
    (``redact`` leaves any part shorter than MIN_SCRUBBED_CHARS.)"""
    scheme, _, credential = header_value.strip().partition(" ")
    credential = credential.strip()
    if not credential or not scheme.replace("-", "").isalnum():
        return []
    parts = [credential]
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credential, validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError
            return parts  # not base64 of text: not Basic credentials after all
        parts += [decoded, decoded.partition(":")[2]]
    return parts


def _resolve_vars(
    namespace: str,
    variables: list[EnvVar] | None,
    what: str,
    resolve_secret: SecretResolver,
    secrets: list[str],
    transport: str,
) -> tuple[tuple[str, str], ...]:
    """Name/value pairs with secret references read (their values also added to ``secrets``), each
    Secret's value checked as ``validate_spec`` checks one written in the spec."""
    resolved: list[tuple[str, str]] = []
    for var in variables or []:
        ref = var.value_from.secret_key_ref if var.value_from is not None else None
        if var.value or ref is None:
            # a header written as a YAML block scalar ends in a line break, which no header may hold
            value = var.value or ""
            resolved.append((var.name, value.strip() if what == "header" else value))
            continue
        try:
            value = resolve_secret(namespace, ref.name, ref.key)
        except Exception as exc:  # the resolver's message says what is missing, never a value
            raise UnusableSecret(
                f'cannot resolve {what} "{var.name}" from secret "{ref.name}": {exc}', ref.name
            ) from exc
        secrets.append(value)
        if what == "env var" and "\0" in value:
            raise UnusableSecret(
                f'env var "{var.name}" from secret "{ref.name}" (key "{ref.key}") {NUL_IN_ENV_VALUE}; '
                "store the value without it",
                ref.name,
            )
        if what == "header":
            secrets.extend(_credential_parts(value))
            # A Secret made with `echo` or from a file ends in a newline, which no HTTP header may hold
            # (the HTTP library's error would quote the whole value).
            if problem := _header_value_problem(value):
                raise UnusableSecret(
                    f'header "{var.name}" from secret "{ref.name}" (key "{ref.key}") contains {problem}; '
                    "store the value without it",
                    ref.name,
                )
            # validate_spec could look only at the name of a header read from a Secret
            if problem := _secret_body_header_problem(var.name, value, transport):
                raise UnusableSecret(
                    f'header "{var.name}" from secret "{ref.name}" (key "{ref.key}") {problem}, '
                    "or remove the header",
                    ref.name,
                )
            value = value.strip()
        resolved.append((var.name, value))
    return tuple(resolved)


def resolve_spec(server: MCPServer, resolve_secret: SecretResolver) -> ResolvedSpec:
    """The spec with secret references replaced by their values (MCPError if it is invalid or a secret
    cannot be read)."""
    spec = server.spec
    problem = validate_spec(spec)
    if problem is not None:
        raise MCPError(problem)
    secrets: list[str] = []
    if spec.transport == "stdio":
        env = _resolve_vars(server.namespace, spec.env, "env var", resolve_secret, secrets, "stdio")
        return ResolvedSpec(
            transport="stdio",
            command=spec.command,
            args=tuple(spec.args or ()),
            env=env,
            secret_values=tuple(secrets),
        )
    headers = _resolve_vars(server.namespace, spec.headers, "header", resolve_secret, secrets, spec.transport)
    return ResolvedSpec(transport=spec.transport, url=spec.url, headers=headers, secret_values=tuple(secrets))
