"""Cutting secrets out of text that leaves the worker: values in their many forms, and URLs."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus

import pytest

from kubechain.redaction import Scrubber, looks_like_credential, redact, redact_url, scrub_then_cut


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://user:tok3n@mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        (
            "https://server.example.ai/x/mcp?api_key=s3cret&profile=p1",
            "https://server.example.ai/x/mcp?api_key=***&profile=***",
        ),
        ("http://127.0.0.1:8000/mcp?debug", "http://127.0.0.1:8000/mcp?debug"),
        ("https://api.example/v1?api_key=k3y-123&sig=abc", "https://api.example/v1?api_key=***&sig=***"),
        # what cannot be parsed is shown up to its host, which is what is wrong
        ("http://svc:pa55word@[::1/v1?token=t0k3n", "http://[::1"),
        ("//svc:pa55word@[::1", "//[::1"),
    ],
)
def test_a_servers_url_is_shown_without_credentials_or_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # a password (or a token for a user) with "/", "?" or "#" unescaped: the host is after the last "@"
        ("redis://:s3cr/et@127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
        ("redis://:sec#ret@127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
        ("redis://:sec?ret@127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
        ("redis://user:pa/ss@127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
        ("REDIS://user:1234/5678@redis.example.com:6379/0", "redis://redis.example.com:6379/0"),
        (
            "rediss://:p@ss/w#rd?@redis.example.com:6380/0?ssl_cert_reqs=none",
            "rediss://redis.example.com:6380/0?ssl_cert_reqs=***",
        ),
        ("https://user:pa/ss@api.example.com/v1", "https://api.example.com/v1"),
        ("https://AbC9x/Yz+q#w@github.com/org/repo.git", "https://github.com/org/repo.git"),
        ("https://user:1234/5678@host/v1?key=k", "https://host/v1?key=***"),
        ("https://user:p@ss/w@api.example.com/v1", "https://api.example.com/v1"),
        ("http://svc:pa55/word@[::1/v1?token=t0k3n", "http://[::1"),
    ],
)
def test_a_password_with_reserved_characters_is_cut_out_whole(url: str, shown: str) -> None:
    """urlsplit ends the host's part at the first "/", "?" or "#", so such a password was shown (in part:
    "redis://:s3cr/et@127.0.0.1:1/0" as itself, its host taken for "" and its port for "s3cr")."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/path?email=a@b.example",
        "https://medium.com/@user",
        "https://registry.npmjs.org/@scope/pkg",
        (
            "https://us-east5-aiplatform.googleapis.com/v1/projects/p/locations/us-east5/publishers/"
            "anthropic/models/claude-3-5-sonnet-v2@20241022:rawPredict"
        ),
        "http://localhost:8080/users/a@b#c@d",
        "http://127.0.0.1:8080/a@b",
        "http://[::1]:8080/a@b",
        "https://svc.ns.svc.cluster.local/a@b",
    ],
)
def test_an_at_sign_after_a_named_host_is_part_of_the_url(url: str) -> None:
    """Of an http(s) URL whose host is a name with a dot, localhost or an IP address: a path, a query or a
    fragment may hold an "@" (a Vertex AI model, a profile, an e-mail address), which is no password's."""
    shown = redact_url(url)
    assert shown == url.replace("email=a@b.example", "email=***"), shown
    assert (
        redact_url("https://user:pw@api.example.com/models/m@2024") == "https://api.example.com/models/m@2024"
    )


def pieces(secret: str, text: str, size: int = 8) -> list[str]:
    """The ``size``-character pieces of ``secret`` that ``text`` holds."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1) if secret[i : i + size] in text]


PEM_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
    "-----END PRIVATE KEY-----\n"
)
SERVICE_ACCOUNT = json.dumps(
    {
        "type": "service_account",
        "private_key_id": "5f1c0ffee0ddba11c0de5eed",
        "private_key": PEM_KEY,
        "client_email": "runner@example-project.iam.gserviceaccount.com",
    },
    indent=2,
)


CA_DATA = base64.b64encode(
    b"-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAjMSEwHwYDVQQDDBhrM3Mtc2VydmVy\n"
    b"-----END CERTIFICATE-----\n"
).decode()
CLIENT_KEY_DATA = base64.b64encode(PEM_KEY.encode()).decode()
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRlbW8ifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl"
KUBECONFIG = f"""apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {CA_DATA}
    server: https://kubernetes.default.svc:443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-key-data: {CLIENT_KEY_DATA}
    token: {TOKEN}
    password: correcthorsebattery
"""
# a random key that happens to have no digit (1 in 15 of 16 characters), under a name that says nothing
SESSION = "endpoint: https://api.example.com/v2\nsession: eUvfJIssDjPTTKtbTxxD\n"
# a .env file: a password in a URL, and a setting that is none
DOTENV = "DATABASE_URL=postgres://app:hunter-pass@db.internal:5432/orders\nLOG_LEVEL=info\n"
# What each multi-line secret holds that is a credential: what no line of text may show a piece of.
CREDENTIALS = {
    "pem": (PEM_KEY, PEM_KEY.splitlines()[1:-1]),
    "service-account": (SERVICE_ACCOUNT, ["5f1c0ffee0ddba11c0de5eed", *PEM_KEY.splitlines()[1:-1]]),
    "kubeconfig": (KUBECONFIG, [CA_DATA, CLIENT_KEY_DATA, TOKEN, "correcthorsebattery"]),
    "key-without-digits": (SESSION, ["eUvfJIssDjPTTKtbTxxD"]),
    "dotenv": (DOTENV, ["hunter-pass"]),
}


@pytest.mark.parametrize(("secret", "credentials"), CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_a_multi_line_secret_is_cut_out_of_text_that_quotes_it_a_line_at_a_time(
    secret: str, credentials: list[str]
) -> None:
    """A child's stderr is scrubbed a line at a time: the key, certificate or token of a PEM key, a JSON
    service account or a kubeconfig never shows there, in whole or in part."""
    for line in secret.splitlines():
        said = redact(f"[server] {line}", [secret])
        for credential in credentials:
            assert not pieces(credential, said), said


@pytest.mark.parametrize(
    ("secret", "credential"),
    [
        (KUBECONFIG, TOKEN),
        (KUBECONFIG, CLIENT_KEY_DATA),
        (KUBECONFIG, "correcthorsebattery"),
        (SERVICE_ACCOUNT, "5f1c0ffee0ddba11c0de5eed"),
        (SERVICE_ACCOUNT, PEM_KEY),  # a JSON string in the secret, its line breaks escaped
        (SESSION, "eUvfJIssDjPTTKtbTxxD"),
        (DOTENV, "postgres://app:hunter-pass@db.internal:5432/orders"),
    ],
    ids=[
        "kubeconfig-token",
        "kubeconfig-client-key",
        "kubeconfig-password",
        "key-id",
        "private-key",
        "session",
        "database-url",
    ],
)
def test_a_credential_of_a_multi_line_secret_is_cut_out_where_text_quotes_it_alone(
    secret: str, credential: str
) -> None:
    """A server given a kubeconfig or a service account says what it uses, not the line it read it from:
    a token in the Authorization header an API echoes, the key it loaded."""
    for text in (
        f"401: Authorization: Bearer {credential} expired",
        f"loaded {credential} ({len(credential)})",
    ):
        said = "\n".join(redact(line, [secret]) for line in text.splitlines())
        for line in credential.splitlines()[1:-1] if "PRIVATE KEY" in credential else [credential]:
            assert not pieces(line, said), said


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("redis://:Hunter2-pass@redis:6379/0", "Hunter2-pass"),
        ("postgres://app:p%40ss-w0rd%21@db.internal/orders", "p@ss-w0rd!"),
        ("amqp://guest:Gu3st-pass@rabbitmq:5672/", "Gu3st-pass"),
    ],
)
def test_the_password_of_a_url_a_multi_line_secret_sets_is_cut_out_alone(url: str, password: str) -> None:
    """A server says where it connects (the URL, cut out whole), and a failed login may quote the password
    alone (as the URL sets it, unescaped)."""
    secret = f"LOG_LEVEL=info\nBROKER_URL={url}\n"
    assert redact(f"connecting to {url}", [secret]) == "connecting to ***"
    assert redact(f"AUTH {password} failed", [secret]) == "AUTH *** failed"


def test_a_urls_password_that_is_a_word_is_left_in_other_text() -> None:
    """As a setting named as a secret's (see ``_is_word``): the URL is cut out, not the word."""
    secret = "LOG_LEVEL=info\nDATABASE_URL=postgres://postgres:postgres@db:5432/orders\n"
    said = redact("user postgres at postgres://postgres:postgres@db:5432/orders", [secret])
    assert said == "user postgres at ***"


@pytest.mark.parametrize(
    "secret",
    [
        "# sourced by the server's entrypoint\nexport API_TOKEN=Hunter2Pass!\nexport LOG_LEVEL=info\n",
        '{\n  "user": "botuser1", "password": "Hunter2Pass!",\n  "port": 5432\n}\n',
        '{"users": [{"user": "botuser1", "password": "Hunter2Pass!"}]}\n{"port": 5432}\n',
        '{"auths": {"registry.example.com": {"username": "botuser1", "password": "Hunter2Pass!"}}}',
    ],
    ids=["export", "json-pairs-on-a-line", "json-line", "dockerconfigjson"],
)
def test_a_credential_a_shell_or_json_setting_sets_is_cut_out_alone(secret: str) -> None:
    """A .env file sourced by a shell sets with "export"; compact JSON sets several values a line, or
    all of them (a docker config): the value of each setting named as a secret is taken, not the line
    from its first value on."""
    assert redact("login Hunter2Pass! failed", [secret]) == "login *** failed"
    assert redact("user botuser1", [secret]) == "user botuser1"


def test_a_json_line_nested_too_deep_to_read_is_cut_out_as_a_line() -> None:
    """json.loads raises RecursionError, no ValueError, past about a thousand levels."""
    line = '{"password": "Hunter2Pass!", "a": ' + '{"a": ' * 5000 + "1" + "}" * 5001
    assert redact(f"read {line}", [f"{line}\nport: 5432\n"]) == "read ***"


EKS_SERVER = "https://9F3A0C1B2D4E5F60718293A4B5C6D7E8.gr7.us-west-2.eks.amazonaws.com"


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        (
            KUBECONFIG.replace("https://kubernetes.default.svc:443", EKS_SERVER),
            f"control plane at {EKS_SERVER}",
        ),
        (
            f"LOG_LEVEL=info\nAPI_URL={EKS_SERVER}/api/v1?resourceVersion=12345678\n",
            f"GET {EKS_SERVER}/api/v1?resourceVersion=12345678",
        ),
        ("LOG_LEVEL=info\nhttpRoute: /api/v1/usrMgmt/pwdRst\n", "GET /api/v1/usrMgmt/pwdRst 200"),
        (
            "LOG_LEVEL=info\nHOOK=https://hooks.example/api/v1/usrMgmt/pwdRst\n",
            "POST https://hooks.example/api/v1/usrMgmt/pwdRst 200",
        ),
    ],
    ids=["eks-server", "eks-api-url", "route", "url-path"],
)
def test_a_url_or_a_path_a_multi_line_secret_sets_is_left_in_other_text_without_a_credential(
    secret: str, text: str
) -> None:
    """A URL is judged by where it may hold a credential (its user, password, path segments, query and
    fragment), not its host: an EKS cluster's is 32 hex digits, and every "kubectl cluster-info" says it. A
    path's segments are judged one at a time: "/api/v1/usrMgmt/pwdRst" is a path of names."""
    assert redact(text, [secret]) == text


@pytest.mark.parametrize(
    "value",
    [
        "https://hooks.slack.com/services/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",
        "https://api.example.com/hook?sig=aB3dE5fG7hI9jK1lM3nO5pQ7&ts=1700000000",
        "https://api.example.com/hook?token=hunter2-pass",
        "https://app.example.com/callback#access_token=hunter2-pass",
        "https://ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU@github.com/org/repo.git",
        "/keys/aB3dE5fG7hI9jK1lM3nO5pQ7.pem",
    ],
    ids=["key-in-path", "signature", "token-named", "fragment", "token-as-user", "path"],
)
def test_a_url_or_a_path_with_a_credential_a_multi_line_secret_sets_is_cut_out_alone(value: str) -> None:
    secret = f"LOG_LEVEL=info\nWEBHOOK={value}\n"
    assert redact(f"posting to {value}", [secret]) == "posting to ***"


# settings named as secrets whose values are words or names: in every other text
WORD_PASSWORDS = {
    "dotenv": "POSTGRES_PASSWORD=postgres\nREDIS_PASSWORD=default\nADMIN_PASSWORD=kubernetes\nLOG=info\n",
    "yaml": "password: password\nsecret: secret\ntoken: enabled\nsecretKey: minioadmin\napiKey: my-api-key\n",
}


@pytest.mark.parametrize("secret", WORD_PASSWORDS.values(), ids=WORD_PASSWORDS.keys())
def test_a_word_a_setting_named_as_a_secret_sets_is_left_in_other_text(secret: str) -> None:
    """A password that is a word or a name ("postgres", "default": letters, "-" or "_" between them, 12
    characters at most) is in any text: cut out of it ("kubectl get pods -n ***") it would garble it. The
    line that sets it is cut out."""
    text = "kubectl get pods -n default: postgres on kubernetes; minioadmin console; my-api-key; enabled"
    assert redact(text, [secret]) == text
    for line in secret.splitlines()[:-1]:
        assert redact(f"read {line}", [secret]) == "read ***"


@pytest.mark.parametrize(
    "password",
    ["hunter2", "48291734", "correcthorsebattery", "correct-horse-battery", "p@ssword", "Tr0ub4dor&3"],
)
@pytest.mark.parametrize("setting", ["DB_PASSWORD={}", "password: {}", '"client_secret": "{}",'])
def test_a_password_more_than_a_word_is_cut_out_alone(setting: str, password: str) -> None:
    """A digit, a sign, or more than 12 characters (a passphrase): no word or name, it is cut out where text
    quotes it alone."""
    secret = f"LOG_LEVEL=info\n{setting.format(password)}\n"
    assert redact(f"login with {password} failed", [secret]) == "login with *** failed"


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        (KUBECONFIG, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: default\nusers:\n"),
        (KUBECONFIG, "kind: Config\ncurrent-context: default\nclusters:\n"),
        (SERVICE_ACCOUNT, '{\n  "type": "service_account",\n  "project_id": "p"\n}'),
        (PEM_KEY, "-----BEGIN PRIVATE KEY-----\n(redacted)\n-----END PRIVATE KEY-----"),
        (SESSION, "endpoint: https://api.example.com/v2\n"),
        (DOTENV, "LOG_LEVEL=info\n"),
    ],
    ids=["pod-yaml", "kubeconfig-yaml", "json", "pem-markers", "url", "dotenv"],
)
def test_the_ordinary_lines_of_a_multi_line_secret_are_left_in_other_text(secret: str, text: str) -> None:
    """A kubeconfig is a natural secret for a Kubernetes MCP server, whose every answer is YAML: its lines
    that carry no credential ("apiVersion: v1", "name: default", a PEM marker) are not cut out of it."""
    assert redact(text, [secret]) == text


@pytest.mark.parametrize(
    "secret", ['pa"ss-s3cret-value', "it's\\s3cret-value", "two\nline-s3cret-value"], ids=str.encode
)
@pytest.mark.parametrize("quote", [json.dumps, repr])
def test_a_secret_quoted_escaped_in_a_json_or_python_literal_is_cut_out(
    secret: str, quote: Callable[[object], str]
) -> None:
    """Errors quote structures: a JSON body, a dict's repr, where the value's quotes, backslashes and
    line breaks come escaped."""
    said = redact(f"invalid config: {quote({'key': secret})}", [secret])
    assert not pieces(secret, said) and "***" in said, said


def small_hex(encoded: str) -> str:
    """``encoded`` with its escapes in small letters, as some encoders write them (``%2f``)."""
    return re.sub(r"%[0-9A-F]{2}", lambda escape: escape.group().lower(), encoded)


PERCENT_ENCODINGS: dict[str, Callable[[str], str]] = {
    "query": lambda secret: quote(secret, safe=""),
    "form": quote_plus,
    "path": quote,
    "query-small-hex": lambda secret: small_hex(quote(secret, safe="")),
    "form-small-hex": lambda secret: small_hex(quote_plus(secret)),
    # what encoders of other languages leave unescaped
    "js-encodeURIComponent": lambda secret: quote(secret, safe="!'()*"),
    "js-encodeURI": lambda secret: quote(secret, safe="!#$&'()*+,/:;=?@"),
    "go-PathEscape": lambda secret: quote(secret, safe="$&+:=@"),
    "go-URL-path": lambda secret: quote(secret, safe="$&+,/:;=@"),
}


@pytest.mark.parametrize("encode", PERCENT_ENCODINGS.values(), ids=PERCENT_ENCODINGS.keys())
@pytest.mark.parametrize(
    "secret",
    ["sk/Ab+c=d:e f-0123456789", "Pa$$:w0rd!(x)*'@a;b,c&d=e+f g/h", "s3cret-0123456789abcdef"],
    ids=["escaped", "signs", "plain"],
)
def test_a_percent_encoded_secret_is_cut_out(secret: str, encode: Callable[[str], str]) -> None:
    """An API echoes the URL or the form body it was sent in its error: the key comes percent-encoded."""
    said = redact(f"400 Bad Request: GET https://api.example/v1?key={encode(secret)}&page=2", [secret])
    assert said == "400 Bad Request: GET https://api.example/v1?key=***&page=2", said


@pytest.mark.parametrize("encode", PERCENT_ENCODINGS.values(), ids=PERCENT_ENCODINGS.keys())
def test_a_percent_encoded_multi_line_secret_is_cut_out_a_credential_line_at_a_time(
    encode: Callable[[str], str],
) -> None:
    """A multi-line secret percent-encoded is its lines' encodings joined by "%0A": each credential line
    is cut out of it, as of text that quotes it a line at a time (its markers, in every PEM text, left)."""
    said = redact(f"400 Bad Request: GET https://api.example/v1?key={encode(PEM_KEY)}&page=2", [PEM_KEY])
    assert said.count("***") == 2 and "PRIVATE" in said, said
    for line in PEM_KEY.splitlines()[1:-1]:
        assert not pieces(encode(line), said), said


@pytest.mark.parametrize(
    ("secret", "text"),
    [
        (
            "SMTP_HOST=mail\nSMTP_PASSWORD=p@ss w0rd!\n",
            "connecting to smtp://user:p%40ss%20w0rd%21@mail failed",
        ),
        (
            KUBECONFIG.replace(TOKEN, "Ab+cD/eF0gHiJ+kLmN/oPq="),
            "GET /watch?token=Ab%2BcD%2FeF0gHiJ%2BkLmN%2FoPq%3D",
        ),
        (
            KUBECONFIG.replace(TOKEN, "Ab+cD/eF0gHiJ+kLmN/oPq="),
            "GET /watch?token=Ab%2bcD%2feF0gHiJ%2bkLmN%2foPq%3d",
        ),
        (
            "LOG_LEVEL=info\nAPI_KEY='sk\"9f-0123456789abcdef'\n",
            'bad request: {"key": "sk\\"9f-0123456789abcdef"}',
        ),
        (
            "LOG_LEVEL=info\nAPI_KEY=sk\\9f-0123456789abcdef\n",
            "bad request: {'key': 'sk\\\\9f-0123456789abcdef'}",
        ),
    ],
    ids=["dotenv-password-in-url", "kubeconfig-token-in-query", "small-hex", "json", "repr"],
)
def test_a_credential_of_a_multi_line_secret_is_cut_out_encoded(secret: str, text: str) -> None:
    """A credential taken out of a multi-line secret shows encoded as the whole secret does: percent-encoded
    in a URL an API echoes, escaped in a JSON body or a dict's repr."""
    said = redact(text, [secret])
    assert "***" in said and not re.search(r"p%40ss|kLmN|9f-0123", said), said


def test_a_secret_that_nothing_escapes_has_no_percent_encoded_forms() -> None:
    """Each form is looked for in every line scrubbed: one equal to the secret would cost for nothing."""
    assert Scrubber(["s3cret-0123456789abcdef"]).forms == ("s3cret-0123456789abcdef",)


def test_a_line_is_not_looked_for_percent_encoded_where_the_credential_it_sets_is() -> None:
    """Each percent-encoded form is looked for in every text holding a "%"; a line's would cut out only
    what its credential's does, and its name: percent-encoding escapes a character at a time."""
    secret = "LOG_LEVEL=info\nAPI_KEY=sk/Ab+c=d:e f-0123456789\n"
    forms = Scrubber([secret]).forms
    assert not [form for form in forms if "%" in form and form.startswith("API_KEY")], forms
    assert (
        redact("POST /login?API_KEY=sk%2FAb%2Bc%3Dd%3Ae+f-0123456789", [secret]) == "POST /login?API_KEY=***"
    )


def test_percent_escapes_that_are_no_secret_are_left() -> None:
    scrub = Scrubber(["sk/Ab+c=d:e f-0123456789"])
    assert scrub("GET /search?q=caf%C3%A9+au+lait&sk=%2F") == "GET /search?q=caf%C3%A9+au+lait&sk=%2F"


def test_scrubbing_comes_before_the_cut() -> None:
    secret = "s3cret-0123456789abcdef"
    text = "x" * 90 + secret
    assert scrub_then_cut(text, lambda t: redact(t, [secret]), 100) == "x" * 90 + "***"


def test_a_text_read_only_in_part_keeps_no_piece_of_a_secret_it_ends_inside() -> None:
    """A body or a line read up to a limit may end inside a secret, which scrubbing cannot recognise:
    what could come from its last ``margin`` characters is left out, however much scrubbing shortened
    what came before."""
    secret = "s3cret-0123456789abcdef"
    text = "x" * 50 + (secret + " ") * 20
    for end in range(len(text) + 1):
        said = scrub_then_cut(text[:end], lambda t: redact(t, [secret]), 60, margin=len(secret))
        assert not pieces(secret, said), (end, said)
        assert len(said) == min(60, max(0, len(redact(text[:end], [secret])) - len(secret)))


@pytest.mark.parametrize(
    "text",
    [
        CA_DATA[:24],
        TOKEN.split(".")[1],
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AKIAIOSFODNN7EXAMPLE",
        '"private_key_id": "5f1c0ffee0ddba11c0de5eed",',
        "DB_PASSWORD=correcthorsebattery",
        '"client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty"',
        "DATABASE_URL=postgres://app:hunter-pass@db.internal:5432/orders",
        "REDIS_URL=redis://:hunter-pass@redis:6379/0",  # a password and no user name
        # settings named as secrets, whatever their values
        "aws_secret_access_key = hunter-secret-Abcdefgh",
        "secretKey: minio-secret-pass",
        '"secret_key": "correct horse"',
        "passphrase: correct horse battery staple",
        # random, without a digit: letters that come apart into no words
        "XXFWXLCpaNfhs+gC",
        "session: eUvfJIssDjPTTKtbTxxD",
        '"cookie": "HZbKoXi-dTHQgTNBEjEo",',
        "suDZgCSTYGqClBUEePrFxgmV",
    ],
)
def test_a_line_with_a_key_token_or_password_looks_like_a_credential(text: str) -> None:
    assert looks_like_credential(text)


@pytest.mark.parametrize(
    "text",
    [
        "insecure-skip-tls-verify: true",
        "certificateAuthorityData: ''",
        '"auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",',
        '"token_uri": "https://oauth2.googleapis.com/token",',
        "apiVersion: client.authentication.k8s.io/v1beta1",
        "command: /usr/local/bin/gke-gcloud-auth-plugin",
        "interactiveMode: IfAvailable",
        "- arn:aws:eks:us-west-2:123456789012:cluster/my-cluster",
        "secretName: tls-cert",
        "server: https://kubernetes.default.svc:443",
        "url: https://git@github.com/org/repo.git",
        # camelCase and PascalCase names, with acronyms: no digit, capitals and small letters
        "kind: CustomResourceDefinition",
        "kind: MutatingWebhookConfiguration",
        "dnsPolicy: ClusterFirstWithHostNet",
        "provideClusterInfo: true",
        "persistentVolumeReclaimPolicy: Retain",
        "type: kubernetes.io/dockerconfigjson",
        '"x-kubernetes-preserve-unknown-fields": true,',
        "tlsConfig: {insecureSkipVerify: false}",
        "authProvider: {name: OIDCTokenProvider}",
        "- HTTPSProxyFromEnvironment",
        '"$ref": "#/definitions/io.k8s.api.core.v1.PersistentVolumeClaimSpec"',
        "Internationalization and Characterization Strengths",
    ],
)
def test_a_line_of_names_paths_and_numbers_does_not_look_like_a_credential(text: str) -> None:
    assert not looks_like_credential(text)


def counting_secret_forms(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the forms of secrets are worked out from here on (one count per call)."""
    import kubechain.redaction as redaction

    real = redaction.secret_forms
    calls: list[int] = []

    def counted(secrets: Iterable[str]) -> list[str]:
        calls.append(1)
        return real(secrets)

    monkeypatch.setattr(redaction, "secret_forms", counted)
    return calls


def test_a_secret_with_a_lone_surrogate_has_its_forms_worked_out() -> None:
    """A lone surrogate is no UTF-8 (a JSON string can escape one, "\\udcff"): percent-encoding the secret
    raised, and the server or the call holding it failed. Its escape is taken as Python's "surrogatepass"
    writes it."""
    secret = "\udcff-s3cret-0123456789"
    text = f"read {secret} and {quote(secret, errors='surrogatepass')}"
    assert redact(text, [secret]) == "read *** and ***"


def test_a_setting_line_with_a_long_run_of_spaces_is_read_in_linear_time() -> None:
    """A setting's value was matched lazily, then trailing spaces: each length of it tried against the whole
    run of spaces, quadratic. Of 16,000 spaces that took 3 to 6 s (a Scrubber made when a server starts, a
    tool is called); it takes ms now. The bound is loose, for a loaded machine: it tells ms from seconds."""
    started = time.perf_counter()
    Scrubber(["password: a" + " " * 16_000 + "b"])
    assert time.perf_counter() - started < 0.5
