"""Path templates (`/repos/{owner}/{repo}`, `/v1/**`) and target templates (`{owner}/{repo}`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BUILTIN_TARGET_VARS = frozenset({"host", "port", "method", "path", "scheme", "query"})


class TemplateError(ValueError):
    """A template that cannot be compiled; the message says why."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled path template.

    Literal segments match case-insensitively: many API servers route case-insensitively, and
    a rule that fails to match a case variant would let the variant fall through to a weaker
    rule. A single trailing slash is ignored for the same reason.
    """

    source: str
    segments: tuple[str, ...]
    variables: tuple[str, ...]
    rest: bool  # ends with `**`

    def match(self, path: str) -> dict[str, str] | None:
        parts = _split(path)
        fixed = self.segments
        if self.rest:
            if len(parts) < len(fixed):
                return None
        elif len(parts) != len(fixed):
            return None
        captured: dict[str, str] = {}
        for pattern, part in zip(fixed, parts, strict=False):
            if pattern.startswith("{"):
                if part == "":
                    return None
                captured[pattern[1:-1]] = part
            elif pattern.lower() != part.lower():
                return None
        if self.rest:
            captured["**"] = "/".join(parts[len(fixed) :])
        return captured

    def covers(self, other: PathTemplate) -> bool:
        """True when every path `other` matches is also matched by this template (for lint)."""
        if len(self.segments) > len(other.segments) or (not self.rest and other.rest):
            return False
        if not self.rest and len(self.segments) != len(other.segments):
            return False
        for mine, theirs in zip(self.segments, other.segments, strict=False):
            if mine.startswith("{"):
                continue
            if theirs.startswith("{") or mine.lower() != theirs.lower():
                return False
        return True


def _split(path: str) -> list[str]:
    trimmed = path[1:] if path.startswith("/") else path
    if trimmed.endswith("/"):
        trimmed = trimmed[:-1]
    return trimmed.split("/") if trimmed else []


def compile_path(source: str) -> PathTemplate:
    if not source.startswith("/"):
        raise TemplateError(f"{source!r} must start with '/'")
    parts = _split(source)
    rest = False
    segments: list[str] = []
    variables: list[str] = []
    for position, part in enumerate(parts):
        if part == "**":
            if position != len(parts) - 1:
                raise TemplateError(f"{source!r}: '**' is allowed only as the last segment")
            rest = True
            continue
        if "{" in part or "}" in part:
            match = _VARIABLE.fullmatch(part)
            if match is None:
                raise TemplateError(f"{source!r}: a variable must be a whole segment like '{{name}}'")
            if match.group(1) in variables:
                raise TemplateError(f"{source!r}: variable {{{match.group(1)}}} appears twice")
            variables.append(match.group(1))
        elif "*" in part:
            raise TemplateError(f"{source!r}: '*' is allowed only as a whole '**' last segment")
        elif part == "":
            raise TemplateError(f"{source!r}: empty segment")
        segments.append(part)
    return PathTemplate(source=source, segments=tuple(segments), variables=tuple(variables), rest=rest)


def target_variables(template: str) -> set[str]:
    return set(_VARIABLE.findall(template))


def check_target(template: str, available: set[str]) -> None:
    unknown = target_variables(template) - available - _BUILTIN_TARGET_VARS
    if unknown:
        names = ", ".join(sorted(unknown))
        raise TemplateError(f"{template!r} uses {names}, which no path template of the rule captures")


def render_target(template: str, values: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: values.get(m.group(1), ""), template)
