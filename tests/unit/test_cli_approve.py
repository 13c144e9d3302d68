"""``kubechain approve`` / ``kubechain reject`` on the in-memory API server."""

from __future__ import annotations

import pytest

from kubechain.kube.fake import FakeKubeClient


def test_approve_refuses_a_call_that_is_not_waiting_for_a_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target
    from tests.unit.fakes import create

    kube = FakeKubeClient()
    spec = {
        "toolCallId": "c",
        "taskRunRef": {"name": "r"},
        "toolRef": {"name": "fetch__fetch"},
        "arguments": "{}",
    }
    for name in ("running", "waiting", "typo"):
        create(kube, "TaskRunToolCall", "taskruntoolcalls", name, spec)
    kube.patch_status_raw(
        "taskruntoolcalls", "default", "running", None, {"phase": "ReadyToExecuteApprovedTool"}
    )
    kube.patch_status_raw("taskruntoolcalls", "default", "waiting", None, {"phase": "AwaitingHumanApproval"})
    kube.patch_metadata(
        "taskruntoolcalls",
        "default",
        "typo",
        {"annotations": {"kubechain.humanlayer.dev/approval": "approve"}},
    )
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))

    def approval(name: str) -> str | None:
        annotations = kube.get_raw("taskruntoolcalls", "default", name)["metadata"].get("annotations") or {}
        return annotations.get("kubechain.humanlayer.dev/approval")

    refused = CliRunner().invoke(main, ["reject", "running", "--comment", "no", "-n", "default"])
    assert refused.exit_code == 1 and "not waiting for a decision" in refused.output
    assert approval("running") is None, "already approved by HumanLayer: a rejection now would be ignored"
    assert CliRunner().invoke(main, ["approve", "waiting", "-n", "default"]).exit_code == 0
    assert approval("waiting") == "approved"
    assert CliRunner().invoke(main, ["approve", "typo", "-n", "default"]).exit_code == 0
    assert approval("typo") == "approved", "a value that is no decision is replaced"
