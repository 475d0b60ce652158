"""Names and uids that become paths, network namespace names or cgroups are checked first.

A pull request's manifests run as root in `lab test -f`: a uid such as `x/../../tmp/somewhere`
must never turn into a directory outside the cgroup hierarchy, and every path the lab builds from
a name is asserted to stay under its root. Problems name the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from flowproof.errors import InputError
from lab.cluster import Placement, concrete_pods
from lab.config import LabSettings, Names
from lab.errors import LabError
from lab.lifecycle import read_manifests
from lab.merging import probe_pod_requests
from lab.system import check_netns_name, netns_path, under

POD = """apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  uid: {uid}
spec:
  nodeName: {node}
status:
  podIP: {ip}
"""


def write(
    tmp_path: Path,
    uid: str = "0b0b0b0b-0000-4000-8000-000000000000",
    node: str = "node-1",
    ip: str = "10.244.1.11",
) -> Path:
    path = tmp_path / "pod.yaml"
    path.write_text(POD.format(uid=uid, node=node, ip=ip))
    return path


@pytest.mark.parametrize(
    "uid",
    [
        pytest.param("x/../../../../tmp/somewhere", id="a path"),
        pytest.param("0B0B0B0B-0000-4000-8000-000000000000", id="upper case"),
        pytest.param("u-1", id="not a uuid"),
        pytest.param("0b0b0b0b-0000-4000-8000-000000000000/..", id="a uuid and more"),
    ],
)
def test_a_uid_the_api_would_never_issue_is_refused_with_file_line_and_field(
    tmp_path: Path, uid: str
) -> None:
    path = write(tmp_path, uid=f"'{uid}'")
    manifests = read_manifests([path])
    with pytest.raises(InputError) as info:
        concrete_pods(manifests.pods, LabSettings(), manifests.sources)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 6, "metadata.uid")
    assert "not a uid as the API server issues it" in info.value.reason


def test_a_uid_as_the_api_issues_it_is_kept(tmp_path: Path) -> None:
    manifests = read_manifests([write(tmp_path)])
    (spec,) = concrete_pods(manifests.pods, LabSettings(), manifests.sources)
    assert spec.uid == "0b0b0b0b-0000-4000-8000-000000000000"


def test_the_cgroup_builder_refuses_a_uid_that_got_past_the_reader() -> None:
    names = Names("fp")
    with pytest.raises(ValueError, match="not a uid"):
        names.pod_cgroup("systemd", "x/../../etc", "0" * 64)
    with pytest.raises(ValueError, match="not a uid"):
        names.pod_cgroup("cgroupfs", "0b0b0b0b-0000-4000-8000-000000000000", "../x")


@pytest.mark.parametrize(
    ("field", "line", "values", "reason"),
    [
        pytest.param(
            "status.podIP",
            10,
            {"ip": "10.0.0.1"},
            "not a pod address",
            id="an address outside the lab",
        ),
        pytest.param(
            "spec.nodeName",
            8,
            {"node": "node-9"},
            "not a node of this lab",
            id="a node the lab lacks",
        ),
        pytest.param(
            "spec.nodeName", 8, {"node": "node-2"}, "is on node-1", id="an address on another node"
        ),
    ],
)
def test_a_pod_address_or_placement_problem_names_file_line_and_field(
    tmp_path: Path, field: str, line: int, values: dict[str, str], reason: str
) -> None:
    path = write(tmp_path, **values)
    manifests = read_manifests([path])
    settings = LabSettings()

    def place() -> None:
        for spec in concrete_pods(manifests.pods, settings, manifests.sources):
            Placement(settings, [], 1).check_fixed(spec)

    with pytest.raises(InputError) as info:
        place()
    assert (info.value.file, info.value.line, info.value.field) == (str(path), line, field)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "relative",
    ["../x", "a/../../x", "/etc", "", ".", "a/../.."],
)
def test_a_path_built_from_a_name_must_stay_under_its_root(tmp_path: Path, relative: str) -> None:
    with pytest.raises(LabError, match="not inside"):
        under(tmp_path, relative)


def test_a_path_under_its_root_is_joined(tmp_path: Path) -> None:
    assert under(tmp_path, "a/b.slice/c") == str(tmp_path / "a" / "b.slice" / "c")


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "-a", "a b", "a\nb"])
def test_a_network_namespace_name_is_a_plain_name(name: str) -> None:
    with pytest.raises(LabError, match="not a plain name"):
        check_netns_name(name)
    with pytest.raises(LabError):
        netns_path(name)


def test_probe_pod_requests_from_the_collector_are_checked() -> None:
    request = SimpleNamespace(
        namespace="shop", name="flowproof-probe-../x", labels={"flowproof.dev/probe-pod": "true"}
    )
    with pytest.raises(InputError, match="not a valid name"):
        probe_pod_requests([request])


def test_only_joining_a_process_to_the_root_cgroup_may_name_the_root(tmp_path: Path) -> None:
    assert under(tmp_path, "", root_itself=True) == str(tmp_path)
    with pytest.raises(LabError, match="not inside"):
        under(tmp_path, "..", root_itself=True)
