"""``kubechain create llm|agent|mcpserver``, and what every cluster-facing command shares: the
``--namespace/-n``, ``--kubeconfig`` and ``--context`` options, the client, errors and ``-o`` output."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError

from kubechain.cli import main
from kubechain.kube.client import MERGE_PATCH, KubeClient, core_path, custom_path
from kubechain.kube.connection import is_loopback, kubeconfig_exists, kubeconfig_namespace, kubeconfig_path
from kubechain.kube.errors import AlreadyExists, Conflict, KubeAPIError, NotFound, transport_reason
from kubechain.models import (
    API_VERSION,
    LLM,
    Agent,
    AgentSpec,
    APIKeySource,
    LLMParameters,
    LLMSpec,
    LocalObjectReference,
    MCPServer,
    MCPServerSpec,
    ObjectMeta,
    Resource,
    SecretKeyRef,
)
from kubechain.models.base import GROUP
from kubechain.models.mcpserver import EnvVar

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

F = TypeVar("F", bound=Callable[..., Any])


class CLIError(click.ClickException):
    """A clear, expected failure: message on stderr, no traceback, chosen exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        object.__setattr__(self, "exit_code", exit_code)  # click declares it a class variable


# -- connection ------------------------------------------------------------------------------------


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context (current or named), else the in-cluster one, else default."""
    if kubeconfig_exists(kubeconfig):
        try:
            namespace = kubeconfig_namespace(kubeconfig, context)
            if namespace:
                return namespace
        except Exception:  # noqa: BLE001 - an unreadable kubeconfig fails later with a clear message
            pass
        return "default"
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def client_or_refuse(make: Callable[[], KubeClient], kubeconfig: str | None, prefix: str = "") -> KubeClient:
    """``make()``, or a CLI error (exit 2) naming the kubeconfig: loading the connection and building the
    client read the kubeconfig, the CA and client certificate, and run a credential plugin, and a
    missing or garbled file, or a proxy scheme the client cannot use (socks5), fails here."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - kubernetes raises many kinds for a bad kubeconfig
        where = kubeconfig_path(kubeconfig)
        raise CLIError(f"{prefix}cannot load the cluster connection from {where}: {exc}", 2) from None


@dataclass
class Target:
    """Where a command acts: the cluster (kubeconfig + context) and the namespace."""

    namespace: str
    kubeconfig: str | None
    context: str | None
    # whether the namespace was asked for (-n), not the kubeconfig context's or default
    namespace_given: bool = False

    def client(self, timeout_s: float = 30.0) -> KubeClient:
        from kubechain.kube.connection import load_connection

        return client_or_refuse(
            lambda: KubeClient(
                load_connection(self.kubeconfig, self.context), timeout_s=timeout_s, component="kubechain-cli"
            ),
            self.kubeconfig,
        )

    @contextmanager
    def connect(self, timeout_s: float = 30.0) -> Iterator[KubeClient]:
        kube = self.client(timeout_s)
        try:
            yield kube
        except Unreachable as exc:
            raise exc.at(kube.connection.host, kubeconfig_path(self.kubeconfig)) from None
        finally:
            kube.close()


def kube_options(function: F) -> F:
    """Adds ``--namespace/-n``, ``--kubeconfig``, ``--context``; the command receives ``target``."""

    @click.option(
        "--namespace",
        "-n",
        default=None,
        help="namespace (default: the kubeconfig context's namespace, or default)",
    )
    @click.option(
        "--kubeconfig",
        default=None,
        envvar="KUBECONFIG",
        show_envvar=True,
        help="kubeconfig file, or files separated by ':' merged as kubectl merges them "
        "(default: $KUBECONFIG, else ~/.kube/config)",
    )
    @click.option("--context", default=None, help="kubeconfig context (default: the current context)")
    @functools.wraps(function)
    def wrapper(
        *args: Any, namespace: str | None, kubeconfig: str | None, context: str | None, **kwargs: Any
    ) -> Any:
        kubeconfig = kubeconfig or None
        target = Target(
            namespace or context_namespace(kubeconfig, context),
            kubeconfig,
            context,
            namespace_given=bool(namespace),
        )
        return function(*args, target=target, **kwargs)

    return wrapper  # type: ignore[return-value]


def not_found(exc: NotFound, missing: str, exit_code: int = 1) -> CLIError:
    """``missing`` (e.g. 'taskrun "x" not found in namespace "y"'), or, when the API server does not know
    the kind at all, that KubeChain's CRDs are not installed there."""
    if exc.kind_unknown:
        return CLIError(
            "the API server does not know KubeChain's kinds: its CRDs are not installed in this cluster "
            "(kubechain install --crds-only)",
            exit_code,
        )
    return CLIError(missing, exit_code)


class Unreachable(CLIError):
    """No request reached the API server: :meth:`Target.connect` says where it was looked for (:meth:`at`)."""

    def __init__(self, what: str, reason: str, exit_code: int = 1) -> None:
        super().__init__(f"cannot reach the API server ({what}): {reason}", exit_code)
        self.what = what
        self.reason = reason

    def at(self, server: str, kubeconfig: str) -> CLIError:
        """The same failure, with the server's URL and what to check: a server on this machine is most
        likely a `kubechain up` that is not running (any more)."""
        check = (
            "is `kubechain up` running?"
            if is_loopback(server)
            else "is the cluster up, and are this kubeconfig and context the right ones?"
        )
        return CLIError(
            f"cannot reach the API server at {server} ({self.what}): {self.reason}: {check} "
            f"(KUBECONFIG={kubeconfig})",
            self.exit_code,
        )


def api_error(exc: KubeAPIError, what: str, exit_code: int = 1) -> CLIError:
    if exc.status == 0:
        return Unreachable(what, transport_reason(exc), exit_code)
    return CLIError(f"{what}: {exc.message or exc.reason} ({exc.status} {exc.reason})", exit_code)


# -- output ----------------------------------------------------------------------------------------


def dump(obj: Any, output: str) -> str:
    obj = without_managed_fields(obj)
    if output == "json":
        return json.dumps(obj, indent=2, ensure_ascii=False)
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).rstrip("\n")


def without_managed_fields(obj: Any) -> Any:
    """``obj`` (or each item of a List) without metadata.managedFields, the API server's field-ownership
    bookkeeping, as kubectl prints objects unless asked for it (--show-managed-fields)."""
    if not isinstance(obj, dict):
        return obj
    if isinstance(obj.get("items"), list):
        obj = obj | {"items": [without_managed_fields(item) for item in obj["items"]]}
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        obj = obj | {"metadata": {key: value for key, value in metadata.items() if key != "managedFields"}}
    return obj


def echo_objects(objects: list[dict[str, Any]], output: str) -> None:
    """One object as itself; several as a v1 List (json) or a multi-document stream (yaml)."""
    if output == "json":
        payload: Any = (
            objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List", "items": objects}
        )
        click.echo(dump(payload, "json"))
    else:
        click.echo("\n---\n".join(dump(obj, "yaml") for obj in objects))


def resource_ref(kind: str, name: str) -> str:
    return f"{kind.lower()}.{GROUP}/{name}"


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def refs(value: str | None) -> list[LocalObjectReference]:
    return [LocalObjectReference(name=name) for name in split_list(value)]


# -- creating --------------------------------------------------------------------------------------


def wire(resource: Resource[Any, Any]) -> dict[str, Any]:
    body = resource.to_wire()
    body["apiVersion"] = API_VERSION
    body["kind"] = resource.KIND
    body.pop("status", None)
    body["metadata"] = {key: value for key, value in body["metadata"].items() if value not in ({}, [])}
    return body


def create_or_update(
    kube: KubeClient, resource: Resource[Any, Any], update: bool
) -> tuple[dict[str, Any], str]:
    """Create; on AlreadyExists, replace the spec when ``update`` (else a clear error). Returns the
    object and what happened (created / configured / unchanged)."""
    body = wire(resource)
    plural, namespace, name = resource.PLURAL, resource.namespace, resource.name
    ref = resource_ref(resource.KIND, name)
    try:
        return kube.create_raw(plural, namespace, body), "created"
    except AlreadyExists:
        if not update:
            raise CLIError(
                f'{ref} already exists in namespace "{namespace}" (use --update to replace its spec)'
            ) from None
    except KubeAPIError as exc:
        raise api_error(exc, f"cannot create {ref}") from None
    for _ in range(5):
        try:
            current = kube.get_raw(plural, namespace, name)
            if current.get("spec") == body["spec"]:
                return current, "unchanged"
            replacement = {**current, "spec": body["spec"]}
            replacement.pop("status", None)
            return kube.request("PUT", custom_path(plural, namespace, name), body=replacement), "configured"
        except Conflict:
            continue
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot update {ref}") from None
    raise CLIError(f"cannot update {ref}: it kept changing (conflicts)")


def build(factory: Callable[[], Resource[Any, Any]]) -> Resource[Any, Any]:
    try:
        return factory()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise CLIError(f"invalid resource: {problems}") from None


def finish(
    target: Target,
    resource: Resource[Any, Any],
    *,
    update: bool,
    dry_run: bool,
    output: str | None,
    before: Callable[[KubeClient], list[str]] | None = None,
    after: Callable[[KubeClient, dict[str, Any]], None] | None = None,
    undo_before: Callable[[KubeClient], list[str]] | None = None,
    extra_objects: list[dict[str, Any]] | None = None,
) -> None:
    """Print (dry run) or create the resource; ``before`` creates prerequisites (e.g. a Secret), which
    ``undo_before`` removes again when the resource itself cannot be made (so the same command, once its
    problem is fixed, is not refused for what it left behind)."""
    ref = resource_ref(resource.KIND, resource.name)
    if dry_run:
        if output:
            echo_objects([*(extra_objects or []), wire(resource)], output)
        else:
            for obj in extra_objects or []:
                click.echo(f"{obj['kind'].lower()}/{obj['metadata']['name']} created (dry run)")
            click.echo(f"{ref} created (dry run)")
        return
    with target.connect() as kube:
        if not update:
            try:
                kube.get_raw(resource.PLURAL, resource.namespace, resource.name)
                raise CLIError(
                    f'{ref} already exists in namespace "{resource.namespace}" (use --update to replace its spec)'
                )
            except NotFound as missing:
                if missing.kind_unknown:
                    raise not_found(missing, "") from None
            except KubeAPIError as exc:
                raise api_error(exc, f"cannot read {ref}") from None
        for line in before(kube) if before else []:
            click.echo(line)
        try:
            obj, outcome = create_or_update(kube, resource, update)
        except CLIError:
            for line in undo_before(kube) if undo_before else []:
                click.echo(line, err=True)
            raise
        if after:
            after(kube, obj)
    if output:
        echo_objects([obj], output)
    else:
        click.echo(f"{ref} {outcome}")


def output_options(function: F) -> F:
    function = click.option(
        "--output", "-o", type=click.Choice(["yaml", "json"]), default=None, help="print the object"
    )(function)
    function = click.option(
        "--dry-run", is_flag=True, help="do not create anything (with -o: print the object)"
    )(function)
    function = click.option("--update", is_flag=True, help="replace the spec if the object exists")(function)
    return function


@main.group()
def create() -> None:
    """Create an LLM, Agent or MCPServer."""


@create.command("llm")
@click.argument("name")
@click.option("--provider", type=click.Choice(["openai", "anthropic"]), required=True)
@click.option("--model", default=None, help="model name (spec.parameters.model)")
@click.option("--base-url", default=None, help="an OpenAI-compatible endpoint (spec.parameters.baseUrl)")
@click.option("--api-key-secret", default=None, help="existing Secret holding the API key")
@click.option("--api-key-key", default=None, help="key in that Secret (default: <PROVIDER>_API_KEY)")
@click.option(
    "--api-key",
    default=None,
    help="the API key itself ('-' reads it from stdin): stored in a new Secret NAME-api-key",
)
@click.option("--temperature", default=None, help="sampling temperature, 0 to 1")
@click.option("--max-tokens", type=int, default=None)
@output_options
@kube_options
def create_llm(
    target: Target,
    name: str,
    provider: str,
    model: str | None,
    base_url: str | None,
    api_key_secret: str | None,
    api_key_key: str | None,
    api_key: str | None,
    temperature: str | None,
    max_tokens: int | None,
    update: bool,
    dry_run: bool,
    output: str | None,
) -> None:
    """Create an LLM (a provider, its credentials and parameters)."""
    if api_key is not None and api_key_secret:
        raise click.UsageError("use either --api-key or --api-key-secret, not both")
    if api_key_key and not (api_key_secret or api_key is not None):
        raise click.UsageError("--api-key-key needs --api-key-secret or --api-key")
    if api_key == "-":
        api_key = sys.stdin.readline().strip()
    if api_key is not None and not api_key:
        raise click.UsageError("--api-key is empty")
    key = api_key_key or f"{provider.upper()}_API_KEY"
    secret_name = f"{name}-api-key" if api_key is not None else api_key_secret
    api_key_from = (
        APIKeySource(secret_key_ref=SecretKeyRef(name=secret_name, key=key)) if secret_name else None
    )
    has_parameters = bool(model or base_url or temperature or max_tokens)
    resource = build(
        lambda: LLM(
            metadata=ObjectMeta(name=name, namespace=target.namespace),
            spec=LLMSpec(
                provider=provider,  # type: ignore[arg-type]
                api_key_from=api_key_from,
                # built inside build(): an invalid value is a CLI error, not a traceback
                parameters=LLMParameters(
                    model=model, base_url=base_url, temperature=temperature, max_tokens=max_tokens
                )
                if has_parameters
                else None,
            ),
        )
    )
    secret: dict[str, Any] | None = None
    if api_key is not None and secret_name:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret_name, "namespace": target.namespace},
            "type": "Opaque",
            "stringData": {key: api_key},
        }

    created_secret = False

    def create_secret(kube: KubeClient) -> list[str]:
        nonlocal created_secret
        if secret is None:
            return []
        try:
            kube.request("POST", core_path("secrets", target.namespace), body=secret)
            created_secret = True
            return [f"secret/{secret_name} created"]
        except AlreadyExists:
            if not update:
                raise CLIError(
                    f'secret/{secret_name} already exists in namespace "{target.namespace}" '
                    "(use --update to replace the key, or --api-key-secret to use it)"
                ) from None
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot create secret/{secret_name}") from None
        try:
            kube.request(
                "PATCH",
                core_path("secrets", target.namespace, secret_name),
                body={"stringData": {key: api_key}},
                content_type=MERGE_PATCH,
            )
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot update secret/{secret_name}") from None
        return [f"secret/{secret_name} configured"]

    def own_secret(kube: KubeClient, llm: dict[str, Any]) -> None:
        """Deleting the LLM deletes the Secret made for it (garbage collection)."""
        if secret is None or not secret_name:
            return
        owner = {"apiVersion": API_VERSION, "kind": "LLM", "name": name, "uid": llm["metadata"]["uid"]}
        try:
            kube.request(
                "PATCH",
                core_path("secrets", target.namespace, secret_name),
                body={"metadata": {"ownerReferences": [owner]}},
                content_type=MERGE_PATCH,
            )
        except KubeAPIError:
            pass  # cosmetic: the Secret just outlives the LLM

    def delete_created_secret(kube: KubeClient) -> list[str]:
        """The LLM was refused: a Secret this command made would only hold the key with no owner, and
        make the same command fail next time ("already exists")."""
        if not created_secret or not secret_name:
            return []
        try:
            kube.request("DELETE", core_path("secrets", target.namespace, secret_name))
        except NotFound:
            pass
        except KubeAPIError as exc:
            return [
                f"secret/{secret_name} holds the API key and was left behind ({exc}): "
                f"kubectl delete secret {secret_name} -n {target.namespace}"
            ]
        return [f"secret/{secret_name} deleted (it was made for this LLM)"]

    finish(
        target,
        resource,
        update=update,
        dry_run=dry_run,
        output=output,
        before=create_secret,
        after=own_secret,
        undo_before=delete_created_secret,
        extra_objects=[secret] if secret else None,
    )
    if not api_key_from and not dry_run and not output:
        click.echo(
            f"note: no API key given; the LLM reads Secret {provider!r}, key {key!r} "
            f"(kubectl create secret generic {provider} --from-literal={key}=...)",
            err=True,
        )


@create.command("agent")
@click.argument("name")
@click.option("--llm", "llm_name", required=True, help="the LLM resource")
@click.option("--system", required=True, help="the system prompt")
@click.option("--tools", default=None, help="Tool resources, comma-separated")
@click.option("--mcpservers", default=None, help="MCPServer resources, comma-separated")
@click.option("--sub-agents", default=None, help="Agents it may delegate to, comma-separated")
@click.option("--contact-channels", default=None, help="ContactChannels for human contact, comma-separated")
@click.option("--description", default=None, help="what the agent does (shown to delegating agents)")
@output_options
@kube_options
def create_agent(
    target: Target,
    name: str,
    llm_name: str,
    system: str,
    tools: str | None,
    mcpservers: str | None,
    sub_agents: str | None,
    contact_channels: str | None,
    description: str | None,
    update: bool,
    dry_run: bool,
    output: str | None,
) -> None:
    """Create an Agent (an LLM, a system prompt and the tools it may use)."""
    resource = build(
        lambda: Agent(
            metadata=ObjectMeta(name=name, namespace=target.namespace),
            spec=AgentSpec(
                llm_ref=LocalObjectReference(name=llm_name),
                system=system,
                tools=refs(tools),
                mcp_servers=refs(mcpservers),
                sub_agents=refs(sub_agents),
                human_contact_channels=refs(contact_channels),
                description=description,
            ),
        )
    )
    finish(target, resource, update=update, dry_run=dry_run, output=output)


def parse_env(values: tuple[str, ...]) -> list[EnvVar] | None:
    env = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--env expects KEY=VALUE, got {item!r}")
        env.append(EnvVar(name=key, value=value))
    return env or None


@create.command("mcpserver")
@click.argument("name")
@click.option("--transport", type=click.Choice(["stdio", "http", "sse"]), required=True)
@click.option("--command", "command_", default=None, help="stdio: the program to run")
@click.option("--args", "args_", default=None, help="stdio: its arguments, shell-quoted (\"a b 'c d'\")")
@click.option("--env", multiple=True, help="stdio: KEY=VALUE environment variable (repeatable)")
@click.option("--url", default=None, help="http/sse: the server's URL")
@output_options
@kube_options
def create_mcpserver(
    target: Target,
    name: str,
    transport: str,
    command_: str | None,
    args_: str | None,
    env: tuple[str, ...],
    url: str | None,
    update: bool,
    dry_run: bool,
    output: str | None,
) -> None:
    """Create an MCPServer (a Model Context Protocol server whose tools agents may call)."""
    if transport == "stdio" and not command_:
        raise click.UsageError("--transport stdio needs --command")
    if transport != "stdio" and not url:
        raise click.UsageError(f"--transport {transport} needs --url")
    if transport != "stdio" and (command_ or args_ or env):
        raise click.UsageError("--command, --args and --env are for --transport stdio")
    if transport == "stdio" and url:
        raise click.UsageError("--url is for --transport http or sse")
    try:
        args = shlex.split(args_) if args_ else None
    except ValueError as exc:
        raise click.UsageError(f"--args: {exc}") from None
    resource = build(
        lambda: MCPServer(
            metadata=ObjectMeta(name=name, namespace=target.namespace),
            spec=MCPServerSpec(
                transport=transport,  # type: ignore[arg-type]
                command=command_,
                args=args,
                env=parse_env(env),
                url=url,
            ),
        )
    )
    finish(target, resource, update=update, dry_run=dry_run, output=output)
