from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubechain.crdgen import DEFAULT_OUTPUT, all_crds, render_all
from kubechain.models import KINDS, LLM, TaskRun, TaskRunToolCall


def test_committed_crds_equal_generated() -> None:
    rendered = render_all()
    on_disk = {path.name: path.read_text() for path in DEFAULT_OUTPUT.glob("*.yaml")}
    assert set(on_disk) == set(rendered), "run `kubechain crds`"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} is stale: run `kubechain crds`"


def test_every_kind_has_a_status_subresource_and_columns() -> None:
    import yaml

    for info in KINDS:
        crd = yaml.safe_load(render_all()[f"kubechain.humanlayer.dev_{info.plural}.yaml"])
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert version["additionalPrinterColumns"]
        assert crd["spec"]["group"] == "kubechain.humanlayer.dev"


def test_irregular_wire_names_round_trip() -> None:
    toolcall = TaskRunToolCall.from_wire(
        {
            "metadata": {"name": "x"},
            "spec": {
                "toolCallId": "c1",
                "taskRunRef": {"name": "r"},
                "toolRef": {"name": "add"},
                "arguments": "{}",
            },
            "status": {"externalCallID": "ec-1", "phase": "Succeeded"},
        }
    )
    assert toolcall.status.external_call_id == "ec-1"
    assert toolcall.to_wire()["status"]["externalCallID"] == "ec-1"
    assert toolcall.is_terminal()


def test_llm_parameters_and_defaults() -> None:
    llm = LLM.from_wire(
        {
            "metadata": {"name": "m"},
            "spec": {
                "provider": "openai",
                "temperature": "0.2",
                "parameters": {"model": "x", "maxTokens": 10, "baseUrl": "http://h/v1"},
            },
        }
    )
    assert llm.spec.effective_model() == "x"
    assert llm.spec.effective_temperature() == 0.2
    assert llm.spec.effective_max_tokens() == 10
    assert llm.spec.api_key_ref().name == "openai" and llm.spec.api_key_ref().key == "OPENAI_API_KEY"
    with pytest.raises(ValidationError):
        LLM.from_wire({"metadata": {"name": "m"}, "spec": {"provider": "foo"}})


@pytest.mark.parametrize(
    ("penalty", "accepted"),
    [("0", True), ("0.5", True), ("-1.25", True), ("2", True), ("2.0", True), ("-2.00", True)]
    + [("2.5", False), ("-2.9", False), ("2.01", False), ("3", False)],
)
def test_penalties_are_refused_outside_openais_range(penalty: str, accepted: bool) -> None:
    """OpenAI takes -2.0 to 2.0: the original's pattern let 2.5 through, an LLM Ready whose every run
    failed with a 400 once the penalties were sent."""
    wire = {
        "metadata": {"name": "m"},
        "spec": {
            "provider": "openai",
            "parameters": {"frequencyPenalty": penalty, "presencePenalty": penalty},
        },
    }
    if accepted:
        assert LLM.from_wire(wire).spec.parameters.frequency_penalty == penalty
    else:
        with pytest.raises(ValidationError):
            LLM.from_wire(wire)


def test_taskrun_spec_accepts_agent_ref_and_user_message_without_task() -> None:
    run = TaskRun.from_wire(
        {"metadata": {"name": "r"}, "spec": {"agentRef": {"name": "a"}, "userMessage": "hi"}}
    )
    assert run.spec.task_ref is None and run.spec.agent_ref is not None and run.phase == ""


def test_taskrun_columns_are_the_originals_plus_its_agent_in_wide_output() -> None:
    """A run made from agentRef + userMessage has no Task: `kubectl get taskrun -o wide` shows its Agent,
    before the preview, as the seed PR's README shows it (NAME READY STATUS DETAIL AGENT PREVIEW ...)."""
    import yaml

    crd = yaml.safe_load(render_all()["kubechain.humanlayer.dev_taskruns.yaml"])
    columns = [
        (c["name"], c["jsonPath"], c.get("priority", 0))
        for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Ready", ".status.ready", 0),
        ("Status", ".status.status", 0),
        ("Detail", ".status.statusDetail", 1),
        ("Phase", ".status.phase", 0),
        ("Task", ".spec.taskRef.name", 0),
        ("Agent", ".spec.agentRef.name", 1),
        ("Preview", ".status.userMsgPreview", 0),
        ("Output", ".status.output", 0),
        ("Error", ".status.error", 1),
        ("Started", ".status.startTime", 1),
        ("Completed", ".status.completionTime", 1),
    ]


def test_a_spec_with_validation_rules_is_required() -> None:
    """CEL rules on spec run only when there is a spec: a TaskRun with none at all would be accepted at
    apply, though it names neither a Task nor an Agent."""
    import yaml

    for info in KINDS:
        schema = yaml.safe_load(render_all()[f"kubechain.humanlayer.dev_{info.plural}.yaml"])["spec"][
            "versions"
        ][0]["schema"]["openAPIV3Schema"]
        if info.spec_rules:
            assert schema.get("required") == ["spec"], info.kind
    taskruns = yaml.safe_load(render_all()["kubechain.humanlayer.dev_taskruns.yaml"])
    assert taskruns["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["required"] == ["spec"]


def test_crds_from_an_installed_wheel_go_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed from a wheel there is no checkout around the package: `kubechain crds` must not write
    into site-packages (the README then applies ./deploy/crds)."""
    import kubechain.crdgen as crdgen

    site_packages = tmp_path / "site-packages"
    monkeypatch.setattr(crdgen, "DEFAULT_OUTPUT", site_packages / "deploy" / "crds")
    monkeypatch.chdir(tmp_path)
    assert crdgen.default_output() == tmp_path / "deploy" / "crds"
    # `python -m kubechain.crdgen` wrote into site-packages, and made deploy/ there: from then on
    # `kubechain crds` took site-packages for a checkout and wrote there too.
    crdgen.main([])
    assert not (site_packages / "deploy").exists()
    assert sorted(path.name for path in (tmp_path / "deploy" / "crds").iterdir()) == sorted(
        crdgen.render_all()
    )
    (site_packages / "deploy").mkdir(parents=True)  # left by an earlier version
    assert crdgen.default_output() == tmp_path / "deploy" / "crds"
    checkout = tmp_path / "checkout"
    (checkout / "deploy").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'kubechain'\n")
    monkeypatch.setattr(crdgen, "DEFAULT_OUTPUT", checkout / "deploy" / "crds")
    assert crdgen.default_output() == checkout / "deploy" / "crds"


def test_the_readmes_offline_tool_example_is_a_valid_tool_and_script() -> None:
    """The README's "Tools, offline" block: its Tool manifest passes the Tool model (the CRD is generated
    from it) and its script the scripted LLM's, so a reader who copies them gets no validation error."""
    import json
    import re

    import yaml

    from kubechain.llm.scripted_server import Script
    from kubechain.models import Tool

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("**Tools, offline.**") :]
    manifest = re.search(r"<<'YAML'\n(.*?)\nYAML\n", block, re.S)
    script = re.search(r"-d '(\{.*?\})'\n", block, re.S)
    assert manifest is not None and script is not None
    tool = Tool.from_wire(yaml.safe_load(manifest.group(1)))
    assert tool.spec.execute is not None and tool.spec.execute.builtin is not None
    parsed = Script.model_validate(json.loads(script.group(1)))
    assert (
        parsed.rules[0].turns[0].tool_calls and parsed.rules[0].turns[0].tool_calls[0].name == tool.spec.name
    )


def test_the_crd_keeps_a_tool_messages_error_mark() -> None:
    """The schema is structural: a contextWindow key it does not list is pruned by the API server, and the
    Anthropic provider would never learn that a tool call failed."""
    import yaml

    crd = yaml.safe_load(render_all()["kubechain.humanlayer.dev_taskruns.yaml"])
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    message = status["properties"]["contextWindow"]["items"]
    assert message["properties"]["isError"]["type"] == "boolean"
    assert "isError" not in message.get("required", [])


def _undescribed(schema: dict[str, Any], path: str) -> list[str]:
    """The properties under ``schema`` (at ``path``), at any depth, that have no description."""
    missing = []
    for name, prop in schema.get("properties", {}).items():
        where = f"{path}.{name}"
        if not str(prop.get("description", "")).strip():
            missing.append(where)
        missing += _undescribed(prop, where)
    if isinstance(schema.get("items"), dict):
        missing += _undescribed(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += _undescribed(schema["additionalProperties"], f"{path}{{}}")
    return missing


def test_every_spec_and_status_field_has_a_description() -> None:
    """`kubectl explain taskrun.spec` shows what each field is only when the CRD says it: every field of
    a spec or status, nested ones included, is described in its model (Field(description=...)), so a
    new field must be documented to pass."""
    missing = []
    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        kind = crd["spec"]["names"]["kind"]
        for part in ("spec", "status"):
            missing += _undescribed(schema["properties"][part], f"{kind}.{part}")
    assert not missing, f"{len(missing)} fields without a description:\n" + "\n".join(missing)


def _descriptions(schema: dict[str, Any]) -> list[str]:
    found = [schema["description"]] if "description" in schema else []
    for child in (schema.get("properties") or {}).values():
        found += _descriptions(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _descriptions(schema[key])
    return found


def test_setting_defaults_quoted_in_field_descriptions_are_the_settings_defaults() -> None:
    """A description that quotes a setting's default ("KUBECHAIN_TOOL_TIMEOUT_S (120)") says what the
    worker does only while that default stands: a changed default must change the description too."""
    from kubechain.settings import Settings

    quoted = []
    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for text in _descriptions(schema):
            quoted += re.findall(r"KUBECHAIN_([A-Z_]+) \((\d+)(?: s)?\)", text)
    assert quoted, "no description quotes a setting's default any more: drop this test"
    defaults = Settings.model_fields
    wrong = [
        f"KUBECHAIN_{name} ({value}) but the default is {defaults[name.lower()].default}"
        for name, value in quoted
        if defaults[name.lower()].default != float(value)
    ]
    assert not wrong, wrong
    cap = Settings.model_fields["claim_timeout_s"].default - 30
    texts = [
        t
        for crd in all_crds()
        for t in _descriptions(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    ]
    assert any(f"KUBECHAIN_CLAIM_TIMEOUT_S less 30 s ({cap:g})" in t for t in texts)


# The original's CRDs (shared/reference/kubechain-behaviour.md §1): (kind, plural, singular, printer columns
# as (name, type, jsonPath, priority)). Ours add only TaskRun's Agent, in -o wide.
ORIGINAL_CRDS = [
    (
        "LLM",
        "llms",
        "llm",
        [
            ("Provider", "string", ".spec.provider", 0),
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
        ],
    ),
    (
        "Tool",
        "tools",
        "tool",
        [
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
        ],
    ),
    (
        "Agent",
        "agents",
        "agent",
        [
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
        ],
    ),
    (
        "Task",
        "tasks",
        "task",
        [
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
            ("Agent", "string", ".spec.agentRef.name", 0),
            ("Message", "string", ".spec.message", 0),
            ("Output", "string", ".status.output", 1),
        ],
    ),
    (
        "TaskRun",
        "taskruns",
        "taskrun",
        [
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
            ("Phase", "string", ".status.phase", 0),
            ("Task", "string", ".spec.taskRef.name", 0),
            ("Agent", "string", ".spec.agentRef.name", 1),  # ours
            ("Preview", "string", ".status.userMsgPreview", 0),
            ("Output", "string", ".status.output", 0),
            ("Error", "string", ".status.error", 1),
            ("Started", "date", ".status.startTime", 1),
            ("Completed", "date", ".status.completionTime", 1),
        ],
    ),
    (
        "TaskRunToolCall",
        "taskruntoolcalls",
        "taskruntoolcall",
        [
            ("Phase", "string", ".status.phase", 0),
            ("TaskRun", "string", ".spec.taskRunRef.name", 0),
            ("Tool", "string", ".spec.toolRef.name", 0),
            ("Started", "date", ".status.startTime", 1),
            ("Completed", "date", ".status.completionTime", 1),
            ("Error", "string", ".status.error", 1),
        ],
    ),
    (
        "MCPServer",
        "mcpservers",
        "mcpserver",
        [
            ("Connected", "boolean", ".status.connected", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
        ],
    ),
    (
        "ContactChannel",
        "contactchannels",
        "contactchannel",
        [
            ("Type", "string", ".spec.type", 0),
            ("Ready", "boolean", ".status.ready", 0),
            ("Status", "string", ".status.status", 0),
            ("Detail", "string", ".status.statusDetail", 1),
        ],
    ),
]


@pytest.mark.parametrize(
    ("kind", "plural", "singular", "columns"), ORIGINAL_CRDS, ids=[kind for kind, *_ in ORIGINAL_CRDS]
)
def test_names_scope_and_columns_are_the_originals(
    kind: str, plural: str, singular: str, columns: list[tuple[str, str, str, int]]
) -> None:
    """`kubectl get <plural|singular>`, its columns (default and -o wide) and `-o custom-columns` habits of
    the original keep working: no short name or category taken that it did not have, none dropped."""
    import yaml

    crd = yaml.safe_load(render_all()[f"kubechain.humanlayer.dev_{plural}.yaml"])
    assert crd["metadata"]["name"] == f"{plural}.kubechain.humanlayer.dev"
    assert crd["spec"]["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": singular,
    }
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    got = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in version["additionalPrinterColumns"]
    ]
    assert got == columns
