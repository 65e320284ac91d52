"""The package as a user installs it: pip metadata that agrees with the requirement files ComfyUI
users install from, every data file of the library inside the wheel, a registry package without
the development folders, and tests and benchmarks that import the library without sys.path edits."""
import fnmatch
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()]
    return [line for line in lines if line]


def normalised(requirements) -> set[str]:
    return {re.sub(r"\s+", "", r) for r in requirements}


def test_pyproject_builds_with_a_pinned_backend():
    system = PYPROJECT["build-system"]
    assert system["build-backend"] == "setuptools.build_meta"
    assert all("==" in r for r in system["requires"]), system["requires"]


def test_dependencies_agree_with_the_requirement_files():
    project = PYPROJECT["project"]
    assert normalised(project["dependencies"]) == normalised(requirement_lines("requirements.txt"))
    assert normalised(project["optional-dependencies"]["nudenet"]) == normalised(
        requirement_lines("requirements-nudenet.txt"))
    # torch is never pinned for users: installing the pack must not replace ComfyUI's torch
    assert not any(r.startswith("torch==") for r in project["dependencies"])


def test_every_library_data_file_is_in_the_wheel():
    """A file vare_core reads at run time (the embedded model's weights) must match a package-data
    glob, or `pip install .` gives a library that cannot load its own model."""
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]
    data = [p for p in (REPO / "vare_core").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the embedded model's files should be found"
    for path in data:
        covered = False
        for package, patterns in globs.items():
            root = REPO / package.replace(".", "/")
            if root in path.parents:
                relative = path.relative_to(root).as_posix()
                covered |= any(fnmatch.fnmatch(relative, pattern) and relative.count("/") == pattern.count("/")
                               for pattern in patterns)
        assert covered, f"{path.relative_to(REPO)} is not in [tool.setuptools.package-data]"


def test_the_registry_package_leaves_out_tests_and_benchmarks():
    patterns = {line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"tests/", "bench/", ".ci/"} <= patterns
    assert (REPO / "tests" / "golden" / "README.md").is_file()      # the golden tensors live in tests/


def test_tests_and_benchmarks_do_not_edit_sys_path():
    """pytest's `pythonpath` and the installed package make the library importable."""
    edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*=")
    offenders = [p.relative_to(REPO).as_posix() for folder in ("tests", "bench") for p in (REPO / folder).glob("*.py")
                 if edit.search(p.read_text())]
    assert offenders == []


def test_licence_file_matches_the_metadata():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert set(PYPROJECT["project"]["license-files"]) <= {p.name for p in REPO.iterdir()}
