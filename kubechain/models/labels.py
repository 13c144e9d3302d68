"""Label keys of the original KubeChain (kubectl selectors keep working)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

LABEL_TASK = "kubechain.humanlayer.dev/task"
# On a TaskRunToolCall: the TaskRun's name. On a child TaskRun: the delegating tool call's name.
LABEL_TASKRUNTOOLCALL = "kubechain.humanlayer.dev/taskruntoolcall"
LABEL_TOOLCALLREQUEST = "kubechain.humanlayer.dev/toolcallrequest"
LABEL_AGENT = "kubechain.humanlayer.dev/agent"
# Delegation depth of a sub-agent TaskRun (0 for a run a user created).
LABEL_DEPTH = "kubechain.humanlayer.dev/depth"
# On a sub-agent TaskRun: the uid of the run a user created that its delegation chain started from.
LABEL_ROOT_RUN = "kubechain.humanlayer.dev/root-run"
# On a sub-agent TaskRun: the name of the run whose tool call started it (label_value), so
# `kubectl get taskruns -l kubechain.humanlayer.dev/parent-taskrun=<run>` lists a run's sub-agent runs.
LABEL_PARENT_RUN = "kubechain.humanlayer.dev/parent-taskrun"

MAX_LABEL_VALUE = 63
MAX_OBJECT_NAME = 253
# A DNS-1123 subdomain, as the API server requires of an object's name: dot-separated labels of lower-case
# letters, digits and "-", each alphanumeric at both ends.
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_object_name(name: str) -> bool:
    """Whether an object (an Agent, say) may have ``name``: a reference to anything else names nothing."""
    return len(name) <= MAX_OBJECT_NAME and _OBJECT_NAME.fullmatch(name) is not None


def is_namespace_name(name: str) -> bool:
    """Whether a namespace may have ``name``: a DNS-1123 label (a subdomain without dots, 63 at most)."""
    return len(name) <= MAX_LABEL_VALUE and "." not in name and is_object_name(name)


def shortened(name: str, limit: int) -> str:
    """``name`` when it fits in ``limit`` characters, else a prefix of it plus a hash of the whole (stable,
    so a retried create makes the same object). Names start alphanumeric and so does the prefix; the hash
    ends it alphanumeric, and no "-" or "." is left before it, so the result is still a valid name."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def label_value(name: str) -> str:
    """The label value that stands for the object ``name``: the name itself when it fits (so the
    original's labels and kubectl selectors stay the same), else a prefix plus a hash of the whole name.

    Object names may be 253 characters long, label values only 63 (the API server rejects more). Write
    and select through this function, never with the bare name."""
    return shortened(name, MAX_LABEL_VALUE)


def root_run_of(labels: Mapping[str, str], uid: str | None) -> str:
    """The uid of the run a user created that a run's delegation chain started from (the run's own uid
    for such a run), from the run's labels and uid: sub-agent runs and every tool call of the tree carry
    it as the ``root-run`` label."""
    return labels.get(LABEL_ROOT_RUN) or uid or ""
