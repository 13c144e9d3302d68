"""Label keys of the original KubeChain (kubectl selectors keep working)."""

LABEL_TASK = "kubechain.humanlayer.dev/task"
# On a TaskRunToolCall: the TaskRun's name. On a child TaskRun: the delegating tool call's name.
LABEL_TASKRUNTOOLCALL = "kubechain.humanlayer.dev/taskruntoolcall"
LABEL_TOOLCALLREQUEST = "kubechain.humanlayer.dev/toolcallrequest"
LABEL_AGENT = "kubechain.humanlayer.dev/agent"
# Delegation depth of a sub-agent TaskRun (0 for a run a user created).
LABEL_DEPTH = "kubechain.humanlayer.dev/depth"
