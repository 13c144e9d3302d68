"""Generate the CustomResourceDefinitions in ``deploy/crds/`` from the pydantic models.

``kubechain crds`` (or ``python -m kubechain.crdgen``) rewrites the YAML; a test fails when the committed
files differ from what this module generates, so the models are the single source of truth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from kubechain.models import GROUP, KINDS, VERSION, KindInfo

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "deploy" / "crds"


def default_output() -> Path:
    """deploy/crds of this checkout; installed from a wheel (no checkout around the package), ./deploy/crds
    of the current directory, not a directory inside site-packages. A checkout is told by its
    pyproject.toml beside the package, which no install puts there (a deploy/ folder may be: an earlier
    version wrote the CRDs into site-packages)."""
    checkout = DEFAULT_OUTPUT.parent.parent
    return DEFAULT_OUTPUT if (checkout / "pyproject.toml").is_file() else Path.cwd() / "deploy" / "crds"


_KEPT_SCALAR_KEYS = ("enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "format")


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref / single-element allOf / Optional's anyOf-with-null down to one concrete schema."""
    while True:
        if "$ref" in node:
            node = {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node:
            options = [option for option in node["anyOf"] if option.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express union {node['anyOf']} structurally")
            node = {**options[0], **{k: v for k, v in node.items() if k not in ("anyOf", "default")}}
        else:
            return node


def structural_schema(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node to a Kubernetes structural OpenAPI v3 schema."""
    out: dict[str, Any]
    if node.get("x-kubernetes-int-or-string"):
        # The one union a structural schema allows (a resource.Quantity, an IntOrString).
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
        return out | ({"pattern": node["pattern"]} if "pattern" in node else {})
    node = _resolve(node, defs)
    out = {}
    if node.get("description"):
        out["description"] = node["description"].strip()
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out.update({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
        return out
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    schema_type = node.get("type")
    if schema_type is None and "enum" in node:
        schema_type = "string"
    if schema_type == "object" or "properties" in node:
        out["type"] = "object"
        properties = node.get("properties", {})
        if properties:
            out["properties"] = {name: structural_schema(prop, defs) for name, prop in properties.items()}
            required = list(node.get("required", []))
            required += [
                name
                for name, prop in properties.items()
                if prop.get("x-kubechain-required") and name not in required
            ]
            if required:
                out["required"] = required
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = structural_schema(node["additionalProperties"], defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out
    if schema_type == "array":
        out["type"] = "array"
        out["items"] = structural_schema(node.get("items", {}), defs)
        return out
    if schema_type is None:
        raise ValueError(f"schema node without a type: {node}")
    out["type"] = schema_type
    for key in _KEPT_SCALAR_KEYS:
        if key in node:
            out[key] = node[key]
    return out


def crd_for(info: KindInfo) -> dict[str, Any]:
    """The CustomResourceDefinition object for one kind."""
    full = info.model.model_json_schema(by_alias=True, mode="validation")
    defs = full.get("$defs", {})
    spec_schema = structural_schema(full["properties"]["spec"], defs)
    status_schema = structural_schema(full["properties"]["status"], defs)
    for name in ("description",):
        spec_schema.pop(name, None)
        status_schema.pop(name, None)
    spec_schema["description"] = f"{info.kind}Spec defines the desired state of {info.kind}."
    status_schema["description"] = f"{info.kind}Status defines the observed state of {info.kind}."
    if info.spec_rules:
        spec_schema["x-kubernetes-validations"] = [
            {"rule": rule, "message": message} for rule, message in info.spec_rules
        ]
    description = (sys.modules[info.model.__module__].__doc__ or info.kind).strip()
    open_api: dict[str, Any] = {
        "description": description,
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    # The CEL rules on spec run only when there is a spec: an object without one would skip them all.
    if "spec" in full.get("required", []) or info.spec_rules:
        open_api["required"] = ["spec"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [column.to_crd() for column in info.columns],
                    "schema": {"openAPIV3Schema": open_api},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    """Every CRD, generated from the models (the same documents as deploy/crds, with no file to find:
    an installed wheel has none)."""
    return [crd_for(info) for info in KINDS]


def crd_filename(info: KindInfo) -> str:
    return f"{GROUP}_{info.plural}.yaml"


def render_crd(info: KindInfo) -> str:
    header = "# Generated by `kubechain crds` from kubechain/models. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd_for(info), sort_keys=False, default_flow_style=False, width=1000)


def render_all() -> dict[str, str]:
    """File name → YAML text, for every kind."""
    return {crd_filename(info): render_crd(info) for info in KINDS}


def write_crds(output: Path | None = None) -> list[Path]:
    """Write every CRD into ``output`` (default_output() if None); the paths written."""
    output = output or default_output()
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_all().items():
        path = output / filename
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="directory (default: deploy/crds of this checkout, or of the current directory)",
    )
    args = parser.parse_args(argv)
    for path in write_crds(args.output):
        print(path)


if __name__ == "__main__":
    main()
