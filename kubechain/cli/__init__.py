"""The ``kubechain`` command."""

from __future__ import annotations

import click

from kubechain import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """KubeChain: a Kubernetes-native orchestrator for AI agents."""


@main.command()
def version() -> None:
    """Print the KubeChain version."""
    click.echo(f"kubechain {__version__}")


@main.command()
@click.option(
    "--output",
    type=click.Path(),
    default=None,
    help="directory (default: deploy/crds of this checkout, or of the current directory)",
)
def crds(output: str | None) -> None:
    """Regenerate the CRD YAML from the resource models."""
    from pathlib import Path

    from kubechain.crdgen import default_output, write_crds

    for path in write_crds(Path(output) if output else default_output()):
        click.echo(str(path))


from kubechain.cli import install, processes, resources, run, up  # noqa: E402,F401  (registers commands)
