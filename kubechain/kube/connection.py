"""Where the API server is and how to authenticate: kubeconfig (with exec plugins) or in-cluster."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

AUTH_REFRESH_S = 30.0


@dataclass
class ClusterConnection:
    host: str
    verify: str | bool
    cert: tuple[str, str] | None
    _configuration: Any = None
    _cached: tuple[float, dict[str, str]] | None = None

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header, re-derived every 30 s so refreshed exec/OIDC/projected tokens are
        picked up without paying for the refresh on every request."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < AUTH_REFRESH_S:
            return self._cached[1]
        headers = self._derive_headers()
        self._cached = (now, headers)
        return headers

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


def kubeconfig_path(kubeconfig: str | None = None) -> str:
    """The kubeconfig kubectl would read: the explicit path, else $KUBECONFIG, else ~/.kube/config."""
    return kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> ClusterConnection:
    """Kubeconfig (explicit path, $KUBECONFIG or ~/.kube/config) when present, else in-cluster config."""
    cfg = k8s_client.Configuration()
    path = kubeconfig_path(kubeconfig)
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not os.path.exists(path)
    if in_cluster:
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        k8s_config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    verify: str | bool = cfg.ssl_ca_cert if (cfg.verify_ssl and cfg.ssl_ca_cert) else bool(cfg.verify_ssl)
    cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file and cfg.key_file else None
    return ClusterConnection(host=cfg.host.rstrip("/"), verify=verify, cert=cert, _configuration=cfg)
