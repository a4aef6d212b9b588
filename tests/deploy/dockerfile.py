"""A small Dockerfile reader for tests (no Docker engine here): instructions, stages, ARG defaults.

It understands what this repository's Dockerfile uses: parser directives, comments, line
continuations, JSON (exec) and shell forms, `FROM image AS name`, `${VAR}`/`$VAR` from ARGs
declared before the first FROM. Heredocs are not supported (and refused, so nothing is misread).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined with a space
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (CMD ["a"]), or None for shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: {self.keyword} JSON form must be a list of strings")
        return value

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading --flag=value options (COPY --from=..., RUN --mount=...) and the remaining text."""
        rest = self.args.strip()
        found: dict[str, str] = {}
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            found[name] = value if name not in found else found[name] + ";" + value
            rest = rest.lstrip()
        return found, rest


@dataclass
class Stage:
    index: int
    base: str  # image reference after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs (the `ENV KEY VALUE` legacy form too), later ones win."""
        result: dict[str, str] = {}
        for ins in self.all("ENV"):
            parts = shlex.split(ins.args)
            if parts and "=" not in parts[0]:
                result[parts[0]] = " ".join(parts[1:])
                continue
            for part in parts:
                key, _, value = part.partition("=")
                result[key] = value
        return result


@dataclass
class Dockerfile:
    directives: dict[str, str]
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def logical_lines(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    directives: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    # Parser directives: only at the very top, before any comment, blank line or instruction.
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index])
        if not match:
            break
        directives[match.group(1).lower()] = match.group(2)
        index += 1
    result: list[tuple[int, str]] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(lines[index:], start=index + 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments may sit inside a continued instruction; they are dropped
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        result.append((start, " ".join(part for part in buffer if part)))
        buffer = []
    if buffer:
        result.append((start, " ".join(buffer)))
    return directives, result


def substitute(text: str, variables: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, "")

    return _VAR.sub(repl, text)


def parse(text: str) -> Dockerfile:
    directives, lines = logical_lines(text)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if "<<" in args and keyword in ("RUN", "COPY"):
            raise ValueError(f"line {number}: heredocs are not supported by this reader")
        instruction = Instruction(keyword, args.strip(), number)
        if keyword == "FROM":
            flags, rest = instruction.flags()
            del flags  # --platform is irrelevant here
            parts = rest.split()
            base = substitute(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(len(stages), base, name))
            continue
        if not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: only ARG may come before the first FROM")
            key, _, default = instruction.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
            continue
        stages[-1].instructions.append(instruction)
    return Dockerfile(directives, global_args, stages)


def load() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether the build context keeps `path` (a top-level file or directory name) under `patterns`.

    Docker semantics for what this repository uses: patterns in order, the last match wins, `!`
    re-includes; `*` matches any name, `**/x` any depth.
    """
    kept = True
    for raw in patterns:
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = {pattern}
        if pattern.startswith("**/"):
            candidates.add(pattern[3:])
        if any(fnmatch.fnmatchcase(path.rstrip("/"), c) for c in candidates):
            kept = negate
    return kept
