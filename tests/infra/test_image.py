"""infra/image/Dockerfile installs nothing that requirements.lock does not pin (the image cannot be built here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "image" / "Dockerfile"


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def pip_installs() -> list[str]:
    """The argument lists of every `pip install` in the Dockerfile's RUN instructions (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [m.group(1) for m in re.finditer(r"pip install ([^;&|]+)", text)]


def test_every_pip_install_is_constrained_by_the_lock_and_names_only_locked_versions():
    pins, installs = lock(), pip_installs()
    assert len(installs) >= 2, installs
    for args in installs:
        assert "-c requirements.lock" in args, f"unconstrained: pip install {args}"
        for word in args.split():
            if "==" in word:
                name, version = word.split("==")
                key = re.sub(r"[-_.]+", "-", name).lower()
                assert pins.get(key) == version, f"{word} is not the lock's {key}=={pins.get(key)}"


def test_the_project_its_extras_and_their_dependencies_are_all_pinned():
    pins, installs = lock(), pip_installs()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set()
    for args in installs:
        for match in re.finditer(r"'\.\[([\w,]+)\]'", args):
            extras |= set(match.group(1).split(","))
    assert extras == {"server"}, extras
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    for text in requirements:
        requirement = Requirement(text)
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert key in pins, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[key], prereleases=True), f"lock {key}=={pins[key]} vs {text}"
    for package in ("fastapi", "uvicorn", "pyarrow", "aiohttp", "psycopg2-binary"):  # ray's extras, the server's
        assert package in pins, f"{package} is not in requirements.lock"


def test_the_image_runs_as_a_non_root_user_and_installs_the_project_non_editable():
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 1000(:1000)?$", text, re.M)
    assert " -e " not in text and "--editable" not in text
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"base image {base} is not an exact tag"
    assert re.search(r"TORCH_VARIANT=cu130", text) and "download.pytorch.org/whl/cpu" in text
