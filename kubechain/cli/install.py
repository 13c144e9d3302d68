"""``kubechain install``: the CRDs, then (unless ``--crds-only``) the release manifest, by server-side apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from kubechain.cli import main
from kubechain.cli.resources import CLIError, Target, api_error, kube_options
from kubechain.crdgen import all_crds
from kubechain.kube.client import KubeClient
from kubechain.kube.crds import apply_crds, load_crds
from kubechain.kube.errors import KubeAPIError, NotFound

# The package's copy of deploy/release/kubechain.yaml (scripts/render-release writes both), so an installed
# wheel can install itself; the CRDs are generated from the models.
RELEASE_MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "kubechain.yaml"
FIELD_MANAGER = "kubechain-cli"
RELEASE_IMAGE = "ghcr.io/kubechain/kubechain"
APPLY_PATCH = "application/apply-patch+yaml"


class Discovery:
    """kind -> (plural, namespaced) per apiVersion, from the API server's discovery documents."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._cache: dict[str, dict[str, tuple[str, bool]]] = {}

    def _load(self, api_version: str) -> dict[str, tuple[str, bool]]:
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            document = self.kube.request("GET", path)
        except NotFound:
            return {}
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot discover the kinds of {api_version}") from None
        return {
            r["kind"]: (r["name"], bool(r.get("namespaced")))
            for r in document.get("resources") or []
            if "/" not in r.get("name", "")
        }

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        found = self._cache.get(api_version, {}).get(kind)
        if found is None:  # unknown or new (a CRD applied a moment ago): ask again
            self._cache[api_version] = self._load(api_version)
            found = self._cache[api_version].get(kind)
        if found is None:
            raise CLIError(f"the API server does not know kind {kind} of {api_version}")
        return found


def object_path(api_version: str, plural: str, namespace: str | None, name: str) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}/{name}" if namespace else f"{base}/{plural}/{name}"


def display_name(api_version: str, kind: str, name: str) -> str:
    """As kubectl prints it: deployment.apps/NAME, serviceaccount/NAME."""
    group = api_version.rpartition("/")[0]
    return f"{kind.lower()}{'.' + group if group else ''}/{name}"


def server_side_apply(kube: KubeClient, discovery: Discovery, doc: dict[str, Any], namespace: str) -> str:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    if not api_version or not kind or not name:
        raise CLIError(f"manifest object without apiVersion, kind or metadata.name: {str(doc)[:200]}")
    plural, namespaced = discovery.resource(api_version, kind)
    object_namespace = None
    if namespaced:
        object_namespace = doc["metadata"].get("namespace") or namespace
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": object_namespace}}
    try:
        kube.request(
            "PATCH",
            object_path(api_version, plural, object_namespace, name),
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=doc,
            content_type=APPLY_PATCH,
        )
    except KubeAPIError as exc:
        raise api_error(exc, f"cannot apply {kind} {name}") from None
    return f"{display_name(api_version, kind, name)} serverside-applied" + (
        f" (namespace {object_namespace})" if object_namespace else ""
    )


def load_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except yaml.YAMLError as exc:
        raise CLIError(f"{path} is not valid YAML: {exc}") from None
    flat: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") == "List":
            flat.extend(doc.get("items") or [])
        else:
            flat.append(doc)
    return flat


def refuse_other_namespaces(docs: list[dict[str, Any]], namespace: str, manifest: Path) -> None:
    """As ``kubectl apply -n`` does: -n places the objects that name no namespace, and one that names
    another is refused. The release's objects all name kubechain-system (its RBAC binds the
    ServiceAccounts there): ``install -n team-a`` installed there without a word."""
    for doc in docs:
        named = (doc.get("metadata") or {}).get("namespace")
        if named and named != namespace:
            what = "the release manifest" if manifest == RELEASE_MANIFEST else str(manifest)
            raise CLIError(
                f'-n {namespace}: {what} installs into namespace "{named}" (its {doc.get("kind")} '
                f"{doc['metadata'].get('name')} names it), which -n does not change: leave -n out, or give "
                "a manifest for that namespace with --manifest"
            )


def with_image(docs: list[dict[str, Any]], image: str) -> list[dict[str, Any]]:
    """``docs`` with every container of KubeChain's image (the watcher, the workers) running ``image``
    instead: one built from this checkout and pushed to a registry the cluster pulls from."""
    out = []
    for doc in docs:
        pod = ((doc.get("spec") or {}).get("template") or {}).get("spec")
        if isinstance(pod, dict):
            pod = {
                **pod,
                **{
                    key: [
                        {**c, "image": image}
                        if str(c.get("image", "")).split("@")[0].rsplit(":", 1)[0] == RELEASE_IMAGE
                        else c
                        for c in pod[key]
                    ]
                    for key in ("containers", "initContainers")
                    if isinstance(pod.get(key), list)
                },
            }
            doc = {**doc, "spec": {**doc["spec"], "template": {**doc["spec"]["template"], "spec": pod}}}
        out.append(doc)
    return out


@main.command()
@click.option("--crds-only", is_flag=True, help="install the CustomResourceDefinitions only")
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False),
    default=RELEASE_MANIFEST,
    show_default=True,
    help="the release manifest (watcher, workers, Redis, RBAC)",
)
@click.option(
    "--crds-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="CRD YAML files to apply instead of the ones this version of KubeChain defines",
)
@click.option(
    "--image",
    default=None,
    metavar="IMAGE",
    help=f"run the watcher and workers from IMAGE instead of the release's {RELEASE_IMAGE}:<version> "
    "(e.g. one built from this checkout's Dockerfile and pushed where the cluster can pull it)",
)
@kube_options
def install(
    target: Target, crds_only: bool, manifest: Path, crds_dir: Path | None, image: str | None
) -> None:
    """Install KubeChain into the cluster: CRDs, then the release manifest (server-side apply)."""
    if crds_dir is None:
        crds = all_crds()
    else:
        crds = load_crds(crds_dir) if crds_dir.is_dir() else []
        if not crds:
            raise CLIError(f"no CRDs found in {crds_dir}")
    docs: list[dict[str, Any]] = []
    if not crds_only:
        # read and checked before touching the cluster
        if not manifest.is_file():
            raise CLIError(
                f"release manifest {manifest} not found: nothing to deploy besides the CRDs "
                "(use --crds-only, or --manifest PATH)"
            )
        docs = load_manifest(manifest)
        if target.namespace_given:
            refuse_other_namespaces(docs, target.namespace, manifest)
        if image:
            replaced = with_image(docs, image)
            if replaced == docs:
                raise CLIError(
                    f"--image: no container in {manifest} runs {RELEASE_IMAGE}; nothing would use {image}"
                )
            docs = replaced
    with target.connect() as kube:
        try:
            apply_crds(kube, crds)
        except KubeAPIError as exc:
            raise api_error(exc, "cannot apply the CRDs") from None
        except TimeoutError as exc:
            raise CLIError(str(exc)) from None
        for crd in crds:
            click.echo(f"customresourcedefinition.apiextensions.k8s.io/{crd['metadata']['name']} applied")
        if crds_only:
            return
        # CRDs first (and Established) so the objects after them can use the new kinds; Namespaces next.
        # (those deploy/crds already defines were applied above, from the source of truth)
        applied = {crd["metadata"]["name"] for crd in crds}
        manifest_crds = [
            d
            for d in docs
            if d.get("kind") == "CustomResourceDefinition"
            and (d.get("metadata") or {}).get("name") not in applied
        ]
        if manifest_crds:
            try:
                apply_crds(kube, manifest_crds)
            except KubeAPIError as exc:
                raise api_error(exc, "cannot apply the manifest's CRDs") from None
            for crd in manifest_crds:
                click.echo(f"customresourcedefinition.apiextensions.k8s.io/{crd['metadata']['name']} applied")
        rest = [d for d in docs if d.get("kind") != "CustomResourceDefinition"]
        rest.sort(key=lambda d: 0 if d.get("kind") == "Namespace" else 1)
        discovery = Discovery(kube)
        for doc in rest:
            click.echo(server_side_apply(kube, discovery, doc, target.namespace))
        nodeless = nodeless_warning(kube)
    click.echo(f"KubeChain installed from {manifest}")
    if nodeless:
        click.echo(f"warning: {nodeless}", err=True)


def nodeless_warning(kube: KubeClient) -> str | None:
    """Why the Deployments just applied will never run, if the cluster has no node to run them on (a
    `kubechain up` control plane, say); None if it has one, or if we may not list nodes (RBAC)."""
    try:
        nodes = kube.request("GET", "/api/v1/nodes", params={"limit": "1"})
    except KubeAPIError:
        return None
    if nodes.get("items"):
        return None
    return (
        "this cluster has no nodes: the watcher and worker Deployments will never start. A `kubechain up` "
        "control plane runs them itself (as processes); install into a cluster with nodes"
    )
