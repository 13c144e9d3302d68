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
    assert refused.exit_code == 1 and "already approved; ignoring" in refused.output  # as recorded
    assert approval("running") is None, "already approved by HumanLayer: a rejection now would be ignored"
    assert CliRunner().invoke(main, ["approve", "waiting", "-n", "default"]).exit_code == 0
    assert approval("waiting") == "approved"
    assert CliRunner().invoke(main, ["approve", "typo", "-n", "default"]).exit_code == 0
    assert approval("typo") == "approved", "a value that is no decision is replaced"


@pytest.mark.parametrize(
    ("phase", "by_hand", "verb", "said"),
    [
        # HumanLayer rejected it; "approved" was annotated by hand afterwards (ignored by the workers)
        ("ToolCallRejected", "approved", "approve", "already rejected"),
        # HumanLayer approved it and it ran; "rejected" was annotated by hand afterwards
        ("Succeeded", "rejected", "approve", "is Succeeded: it is not waiting for a decision"),
    ],
)
def test_a_decision_is_told_as_the_status_recorded_it_not_as_a_later_annotation(
    monkeypatch: pytest.MonkeyPatch, phase: str, by_hand: str, verb: str, said: str
) -> None:
    import contextlib

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target
    from tests.unit.fakes import create

    kube = FakeKubeClient()
    spec = {"toolCallId": "c", "taskRunRef": {"name": "r"}, "toolRef": {"name": "fetch__fetch"}}
    create(kube, "TaskRunToolCall", "taskruntoolcalls", "tc", spec | {"arguments": "{}"})
    kube.patch_status_raw("taskruntoolcalls", "default", "tc", None, {"phase": phase})
    kube.patch_metadata(
        "taskruntoolcalls", "default", "tc", {"annotations": {"kubechain.humanlayer.dev/approval": by_hand}}
    )
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))
    refused = CliRunner().invoke(main, [verb, "tc", "-n", "default"])
    assert refused.exit_code == 1 and said in refused.output, refused.output
