"""Nothing `make` installs floats: each environment installs from a lock in the repository that agrees with
what it was made from (uv.lock with pyproject.toml; requirements/*.txt with their .in files)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"
UV = os.environ.get("UV") or shutil.which("uv") or str(REPO / ".venv-tools" / "bin" / "uv")


def uv(*args: str) -> subprocess.CompletedProcess:
    if not Path(UV).exists():
        pytest.fail(f"uv is not installed at {UV} (run `make test`, which installs it from requirements/uv.txt)")
    return subprocess.run([UV, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for every requirement of a hash-pinned requirements file."""
    found: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", lock.read_text()):
        head = block.split("\n", 1)[0]
        if not head or head.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", head)
        assert match, f"{lock.name}: not an exact pin: {head!r}"
        found[match.group(1).lower().replace("_", "-")] = (match.group(2), block.count("--hash=sha256:"))
    return found


def test_the_project_lock_agrees_with_pyproject():
    result = uv("lock", "--check")
    assert result.returncode == 0, f"uv.lock does not match pyproject.toml (run `make lock`):\n{result.stderr}"


def test_the_docker_image_installs_exactly_the_project_lock(tmp_path):
    exported = tmp_path / "backend.txt"
    result = uv("export", "--quiet", "--frozen", "--no-emit-project", "--no-dev", "--format", "requirements-txt",
                "-o", str(exported))
    assert result.returncode == 0, result.stderr
    assert pins(exported) == pins(REQUIREMENTS / "backend.txt"), "requirements/backend.txt is stale: run `make lock`"
    assert "requirements/backend.txt" in (REPO / "Dockerfile").read_text()


@pytest.mark.parametrize("name", ["label-studio", "llama", "models", "gemma", "uv"])
def test_every_requirements_lock_pins_each_package_with_hashes_and_covers_its_input(name):
    locked = pins(REQUIREMENTS / f"{name}.txt")
    assert locked, f"requirements/{name}.txt pins nothing"
    unhashed = [package for package, (_, hashes) in locked.items() if hashes == 0]
    assert not unhashed, f"requirements/{name}.txt has packages without hashes: {unhashed}"
    for line in (REQUIREMENTS / f"{name}.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        package, exact = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(?:==(\S+))?", line).groups()
        key = package.lower().replace("_", "-")
        assert key in locked, f"requirements/{name}.in asks for {package}, which requirements/{name}.txt lacks"
        if exact:
            assert locked[key][0] == exact, f"{package}: requirements/{name}.in and {name}.txt disagree"


def test_label_studio_gets_a_sentry_sdk_it_can_start_with():
    # Label Studio 1.23.2 asks for sentry-sdk>=2.16 with no upper bound; 3.0 fails its start
    # (TypeError: Unknown option 'send_default_pii').
    version = pins(REQUIREMENTS / "label-studio.txt")["sentry-sdk"][0]
    assert int(version.split(".")[0]) == 2, version
    assert pins(REQUIREMENTS / "label-studio.txt")["label-studio"][0] == "1.23.2"


def test_the_makefile_installs_only_from_the_locks():
    makefile = (REPO / "Makefile").read_text()
    installs = [line.strip() for line in makefile.splitlines() if re.search(r"\bpip install\b|\buv sync\b", line)]
    assert installs, "the Makefile installs nothing?"
    for line in installs:
        assert ("--require-hashes" in line or "UV_PIP" in line or "--locked" in line or "==" in line), line
    assert "$(UV_PIP)" in makefile and "--require-hashes" in makefile.split("UV_PIP :=")[1].split("\n")[0]
