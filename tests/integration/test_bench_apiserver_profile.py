"""``bench --apiserver-profile`` against the real kube-apiserver: profiles taken while status writes
run, read back with the real ``go tool pprof``, name status writes as work the API server did."""

from __future__ import annotations

from pathlib import Path

from bench.apiserver_profile import ProfileRecorder, summarize
from bench.scenarios import taskrun
from kubechain.kube.client import KubeClient
from kubechain.models import TaskRun
from kubechain.testing.binaries import find_go
from kubechain.testing.controlplane import LocalControlPlane


def test_profile_of_status_writes_shows_them(
    control_plane: LocalControlPlane, kube: KubeClient, namespace: str, tmp_path: Path
) -> None:
    run = TaskRun.from_wire(kube.create_raw("taskruns", namespace, taskrun("profiled", "nobody", "profile")))
    recorder = ProfileRecorder(control_plane, tmp_path / "writes", chunk_s=1).start()
    writes = 0
    # Write until a whole profile has been taken while writing (the first may have begun a moment
    # before the writes did).
    while len(recorder.files) < 2 and recorder.error is None:
        status = {"phase": "Pending", "statusDetail": f"write {writes}", "messageCount": writes}
        run = kube.patch_status(run, status)  # a status write as KubeChain makes it (a PUT)
        writes += 1
    files = recorder.stop()
    assert recorder.error is None
    go = find_go()
    result = summarize(go.go, go.env(), control_plane.binaries.kube_apiserver, files)
    shares = result["cpu_shares_pct"]
    assert shares["status writes"] > 0, (writes, shares)
    assert abs(sum(shares.values()) - 100) < 1
    assert [Path(f).name for f in result["files"]][:2] == ["writes-1.pprof", "writes-2.pprof"]
