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


class ConflictingCRDs:
    """An API server where every CRD exists already (Established, the old schema) and every PUT of a new
    one conflicts: another writer updates it between each GET and PUT."""

    def __init__(self) -> None:
        self.puts = 0

    def request(self, method: str, path: str, **_: object) -> dict[str, object]:
        from kubechain.kube.errors import AlreadyExists, Conflict

        if method == "POST":
            raise AlreadyExists(409, "AlreadyExists", "exists")
        if method == "PUT":
            self.puts += 1
            raise Conflict(409, "Conflict", "the object has been modified; please apply your changes again")
        return {
            "metadata": {"resourceVersion": str(self.puts)},
            "status": {"conditions": [{"type": "Established", "status": "True"}]},
        }


def test_install_says_a_crd_it_could_not_update_instead_of_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_crds gave up after five conflicting PUTs without a word, found the old CRD Established, and
    install printed "... applied" over a schema never written."""
    import contextlib

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target
    from kubechain.kube.crds import apply_crds
    from kubechain.kube.errors import Conflict

    kube = ConflictingCRDs()
    crd = {"metadata": {"name": "llms.kubechain.humanlayer.dev"}, "spec": {}}
    with pytest.raises(Conflict):
        apply_crds(kube, [crd])  # type: ignore[arg-type]
    assert kube.puts == 5

    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))
    result = CliRunner().invoke(main, ["install", "--crds-only"])
    assert result.exit_code != 0, result.output
    assert "cannot apply the CRDs" in result.output and "the object has been modified" in result.output
    assert not [line for line in result.output.splitlines() if line.endswith(" applied")]


def test_install_refuses_a_namespace_the_manifest_does_not_install_into(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kubechain install -n team-a` installed into kubechain-system, where the release's objects are, and
    said nothing: -n only placed objects that name no namespace. As kubectl apply -n does, a namespace an
    object names that is not -n's is refused, before the cluster is touched."""
    import contextlib

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target

    touched: list[str] = []

    class Untouched:
        def request(self, method: str, path: str, **_: object) -> dict[str, object]:
            touched.append(f"{method} {path}")
            raise AssertionError("the cluster was touched")

    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(Untouched()))
    result = CliRunner().invoke(main, ["install", "-n", "team-a"])
    assert result.exit_code == 1, result.output
    assert (
        'Error: -n team-a: the release manifest installs into namespace "kubechain-system" (its ServiceAccount '
        "kubechain-watcher"
    ) in result.output, result.output
    assert touched == []
