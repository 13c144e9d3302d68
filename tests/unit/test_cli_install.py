"""``kubechain install``: a failed discovery request and a cluster without nodes, said in words."""

from __future__ import annotations

import re

import pytest

from kubechain.kube.errors import Forbidden, Unavailable


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            Unavailable(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            "cannot discover the kinds of apps/v1: the server is currently unable to handle the request "
            "(503 ServiceUnavailable)",
        ),
        (Forbidden(403, "Forbidden", "forbidden: discovery"), "cannot discover the kinds of apps/v1"),
    ],
)
def test_install_says_a_failed_discovery_request_as_a_cli_error(error: Exception, said: str) -> None:
    """Every other step of `kubechain install` said its failure; a discovery request's was a traceback."""
    from kubechain.cli.install import Discovery
    from kubechain.cli.resources import CLIError

    class Refusing:
        def request(self, method: str, path: str, **_: object) -> dict[str, object]:
            assert (method, path) == ("GET", "/apis/apps/v1")
            raise error

    with pytest.raises(CLIError, match=re.escape(said)):
        Discovery(Refusing()).resource("apps/v1", "Deployment")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "warned"),
    [
        ({"items": []}, True),
        ({"items": [{"metadata": {"name": "n1"}}]}, False),
        (Forbidden(403, "Forbidden", "nodes"), False),
    ],
)
def test_install_warns_when_the_cluster_has_no_node_to_run_kubechain_on(answer: object, warned: bool) -> None:
    """Into a `kubechain up` control plane (no nodes), install said "installed" and its Deployments sat at
    0/2 for ever without a word."""
    from kubechain.cli.install import nodeless_warning

    class Nodes:
        def request(self, method: str, path: str, **_: object) -> object:
            assert (method, path) == ("GET", "/api/v1/nodes")
            if isinstance(answer, Exception):
                raise answer
            return answer

    said = nodeless_warning(Nodes())  # type: ignore[arg-type]
    assert (said is not None and "no nodes" in said) if warned else said is None
