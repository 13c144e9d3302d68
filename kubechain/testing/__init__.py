"""Real local infrastructure for tests, benchmarks and ``kubechain up``: no mocks.

* :func:`ensure_binaries` - etcd / kube-apiserver / kube-controller-manager (cached, built from source once)
* :class:`LocalControlPlane` - etcd + kube-apiserver (+ kube-controller-manager) on loopback
* :class:`LocalRedis` - a throw-away ``redis-server`` (or, for ``kubechain up``, ``$REDIS_URL``)
"""

from kubechain.testing.binaries import (
    ETCD_VERSION,
    K8S_VERSION,
    BinaryError,
    ControlPlaneBinaries,
    ensure_binaries,
)
from kubechain.testing.controlplane import ControlPlaneError, LocalControlPlane
from kubechain.testing.redis_server import LocalRedis, RedisError

__all__ = [
    "ETCD_VERSION",
    "K8S_VERSION",
    "BinaryError",
    "ControlPlaneBinaries",
    "ControlPlaneError",
    "LocalControlPlane",
    "LocalRedis",
    "RedisError",
    "ensure_binaries",
]
