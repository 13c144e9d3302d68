"""Where the API server is and how to authenticate: kubeconfig (with exec plugins) or in-cluster."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.rest import should_bypass_proxies
from kubernetes.config.kube_config import KubeConfigMerger

AUTH_REFRESH_S = 30.0
RELOAD_MIN_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


@dataclass
class ClusterConnection:
    host: str
    verify: str | bool
    cert: tuple[str, str] | None
    # kubeconfig's tls-server-name: the name the server's certificate is checked against, when it differs
    # from the host the URL names (an IP, a tunnel)
    tls_server_name: str | None = None
    # The cluster's proxy-url (always used, as client-go's http.ProxyURL), else, with proxy_from_environment,
    # HTTPS_PROXY / HTTP_PROXY for the server's scheme, which NO_PROXY's hosts and a loopback server bypass
    # (client-go's ProxyFromEnvironment).
    proxy: str | None = field(default=None, repr=False)  # may carry a password
    no_proxy: str | None = None
    proxy_from_environment: bool = False
    # repr=False: the configuration and the cached header hold the bearer token
    _configuration: Any = field(default=None, repr=False)
    _cached: tuple[float, dict[str, str]] | None = field(default=None, repr=False)
    # Loads the configuration afresh (kubeconfig or in-cluster), for when the API server refuses it.
    _reload: Callable[[], Any] | None = field(default=None, repr=False)
    _reloaded_at: float = field(default=-RELOAD_MIN_INTERVAL_S, repr=False)
    # One thread derives a stale header while the others wait for it: every thread at once ran the
    # refresh (with a kubeconfig's exec plugin, e.g. `aws eks get-token`, one process per worker thread).
    _derive_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def proxy_for_server(self) -> str | None:
        """The proxy requests to the API server go through, or None to connect directly."""
        if not self.proxy:
            return None
        if self.proxy_from_environment and (
            is_loopback(self.host) or should_bypass_proxies(self.host, self.no_proxy or "")
        ):
            return None  # as Go's ProxyFromEnvironment (kubectl's): a local server is never proxied
        return self.proxy

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header, re-derived every 30 s so refreshed exec/OIDC/projected tokens are
        picked up without paying for the refresh on every request."""
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < AUTH_REFRESH_S:
            return cached[1]
        with self._derive_lock:
            now = time.monotonic()
            cached = self._cached
            if cached is not None and now - cached[0] < AUTH_REFRESH_S:
                return cached[1]  # derived by the thread this one waited for
            headers = self._derive_headers()
            self._cached = (now, headers)
            return headers

    def forget_credentials(self) -> None:
        """The API server refused them (401): load the configuration again (the token file, the exec
        plugin; the client library's own refresh waits for the token's expiry, which a revoked or rotated
        token has not reached), at most every few seconds, and derive the header afresh."""
        now = time.monotonic()
        if self._reload is not None and now - self._reloaded_at >= RELOAD_MIN_INTERVAL_S:
            self._reloaded_at = now
            try:
                self._configuration = self._reload()
            except Exception as exc:  # noqa: BLE001 - keep what we have; the next 401 tries again
                log.warning("could not reload the Kubernetes credentials: %s", exc)
            else:
                # An exec plugin may answer with a new client certificate (the old one expired): the
                # client layer builds a new TLS context when this changes.
                self.cert = _client_cert(self._configuration) or self.cert
        self._cached = None

    def _derive_headers(self) -> dict[str, str]:
        cfg = self._configuration
        if cfg is None:
            return {}
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        if token:
            return {"Authorization": token}
        if cfg.username and cfg.password:
            basic = cfg.get_basic_auth_token()
            return {"Authorization": basic} if basic else {}
        return {}


def _client_cert(cfg: Any) -> tuple[str, str] | None:
    """The client certificate and key files of a loaded configuration (exec plugins' data as files)."""
    cert, key = getattr(cfg, "cert_file", None), getattr(cfg, "key_file", None)
    return (cert, key) if cert and key else None


def _environment_proxy(host: str, environ: Mapping[str, str]) -> str | None:
    """HTTPS_PROXY (https servers) or HTTP_PROXY (http), upper or lower case, ``http://`` when it names
    no scheme: what Go's httpproxy.FromEnvironment reads (not ALL_PROXY, nor the OS's proxy settings)."""
    name = "HTTPS_PROXY" if urllib.parse.urlparse(host).scheme == "https" else "HTTP_PROXY"
    value = (environ.get(name) or environ.get(name.lower()) or "").strip()
    if not value:
        return None
    return value if "://" in value else f"http://{value}"


def _environment_no_proxy(environ: Mapping[str, str]) -> str | None:
    return environ.get("NO_PROXY") or environ.get("no_proxy") or None


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (localhost or a loopback address)."""
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def kubeconfig_paths(kubeconfig: str | os.PathLike[str] | None = None) -> list[str]:
    """The kubeconfig files kubectl would read, in order: the explicit value, else $KUBECONFIG, else
    ~/.kube/config. A value may list several files separated by ``os.pathsep`` (``:``), as $KUBECONFIG does
    for kubectl, which merges them; empty entries are skipped and ``~`` is expanded."""
    value = os.fspath(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or ""
    paths = [os.path.expanduser(path) for path in value.split(os.pathsep) if path]
    return paths or [os.path.expanduser("~/.kube/config")]


def kubeconfig_path(kubeconfig: str | None = None) -> str:
    """:func:`kubeconfig_paths` as one string, joined with ``os.pathsep``: what $KUBECONFIG holds and what the
    kubernetes client's loader (``KubeConfigMerger``) reads. A list, not a file: never write to it."""
    return os.pathsep.join(kubeconfig_paths(kubeconfig))


def kubeconfig_exists(kubeconfig: str | None = None) -> bool:
    """Whether any of the kubeconfig files exists (kubectl ignores the missing ones of a list)."""
    return any(os.path.exists(path) for path in kubeconfig_paths(kubeconfig))


def current_context(kubeconfig: str | None = None) -> str | None:
    """The current context kubectl would use: that of the first file of the list that sets one.

    The kubernetes client merges clusters, contexts and users as kubectl does (the first of a name wins)
    but lets the *last* file's ``current-context`` win, so the context is chosen here and passed to it.
    """
    return _current_context(KubeConfigMerger(kubeconfig_path(kubeconfig)))


def _current_context(merger: KubeConfigMerger) -> str | None:
    for path in merger.paths:
        name = (merger.config_files.get(path) or {}).get("current-context")
        if name:
            return str(name)
    return None


def kubeconfig_namespace(kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace set by the context kubectl would use (``context``, else the current one), if any."""
    merger = KubeConfigMerger(kubeconfig_path(kubeconfig))
    name = context or _current_context(merger)
    if merger.config is None or not name:
        return None
    chosen = merger.config["contexts"].get_with_name(name, safe=True)
    namespace = ((chosen.value if chosen is not None else {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


def uses_in_cluster_config(kubeconfig: str | None = None) -> bool:
    """Whether :func:`load_connection` loads the in-cluster configuration (a pod's service account): in a
    pod (KUBERNETES_SERVICE_HOST is set) where none of the kubeconfig files exists."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not kubeconfig_exists(kubeconfig)


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> ClusterConnection:
    """Kubeconfig (explicit, $KUBECONFIG or ~/.kube/config; a file or a merged list of files, as kubectl
    reads it) when one exists, else in-cluster config."""
    in_cluster = uses_in_cluster_config(kubeconfig)
    path = kubeconfig_path(kubeconfig)
    chosen = context or (None if in_cluster else current_context(path))

    def configuration() -> Any:
        # proxy="" and no_proxy="": only the kubeconfig's proxy-url sets a proxy here; the environment's is
        # read below, by Go's rules rather than urllib's
        cfg = k8s_client.Configuration(proxy="", no_proxy="")
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(config_file=path, context=chosen, client_configuration=cfg)
        return cfg

    cfg = configuration()
    explicit_proxy = getattr(cfg, "proxy", None) or None
    proxy = explicit_proxy or _environment_proxy(cfg.host, os.environ)
    verify: str | bool = cfg.ssl_ca_cert if (cfg.verify_ssl and cfg.ssl_ca_cert) else bool(cfg.verify_ssl)
    cert = _client_cert(cfg)
    return ClusterConnection(
        host=cfg.host.rstrip("/"),
        verify=verify,
        cert=cert,
        tls_server_name=getattr(cfg, "tls_server_name", None) or None,
        proxy=proxy,
        no_proxy=_environment_no_proxy(os.environ),
        proxy_from_environment=explicit_proxy is None,
        _configuration=cfg,
        _reload=configuration,
    )
