"""Config mistakes a user can act on: the exception, YAML with line numbers, and error wording.

Everything here turns a low-level failure (a YAML parse error, a pydantic ``ValidationError``, a
bad ``--set``) into a :class:`ConfigError` whose text names the field as a dotted path
(``strategies[1].compression.rank``), the YAML line (or the ``--set`` it came from), the bad value
and what is allowed. The schema itself lives in :mod:`fedpower.config`.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from typing import Annotated, Any, Iterable, Literal, Sequence, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel

#: Where a value sits in the config: keys and list indices, e.g. ("strategies", 1, "compression").
Loc = tuple[Union[str, int], ...]
#: Loc -> 1-based YAML line of that key / list item, or a text such as "--set train.rounds=0".
Lines = dict[Loc, Union[int, str]]

MAX_LISTED_PROBLEMS = 5  # problems spelled out in one ConfigError; the rest are counted


class ConfigError(Exception):
    """User mistake in a config; str() is a short actionable paragraph naming the field (and YAML line when known)."""


class ConfigIssues(ValueError):
    """Raised inside validators: problems at locations relative to the model being validated.

    Each issue is ``(loc, message)``; ``message`` is a sentence, or a pydantic error dict (from a
    nested validation) whose own ``loc`` is appended to ``loc``. ``related`` names other absolute
    locations the message mentions, so their YAML lines can be shown too.
    """

    def __init__(self, issues: Sequence[tuple[Loc, Any]], related: Sequence[Loc] = ()) -> None:
        """Store the issues; str() joins their messages (pydantic shows it if unformatted)."""
        super().__init__("; ".join(str(message) for _, message in issues))
        self.issues = list(issues)
        self.related = list(related)


# ---------------------------------------------------------------------------------------------
# YAML: a SafeLoader with YAML 1.2 floats, duplicate-key detection and a {loc: line} map.

_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` and ``1.0e5`` as floats (PyYAML's YAML 1.1 reads strings)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """A ConfigError for a YAML syntax error, with its line and column."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    hint = ""
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        problem += f" ({context} started at line {context_mark.line + 1})"
    if "\\t" in problem or "\t" in problem:
        hint = " YAML does not allow tabs for indentation; use spaces."
    elif "mapping values are not allowed" in problem:
        hint = " Check the indentation and that every 'key: value' has a space after the colon."
    elif "could not find expected ':'" in problem or "expected <block end>" in problem:
        hint = " Check the indentation of this line and the one before it."
    return ConfigError(f"{where}: YAML syntax error: {problem}.{hint}")


def _check_duplicates(node: yaml.Node, loc: Loc, source: str, depth: int = 0) -> None:
    """Reject a mapping that repeats a key (PyYAML would silently keep the last one)."""
    if depth > 64:
        return
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    where = f"in {dotted(loc)}" if loc else "at the top level"
                    raise ConfigError(
                        f"{source}, line {line}: duplicate key '{key_node.value}' {where} (first at line "
                        f"{seen[key_node.value]}); keep only one."
                    )
                seen[key_node.value] = line
                _check_duplicates(value_node, (*loc, key_node.value), source, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, (*loc, index), source, depth + 1)


def _record_lines(node: yaml.Node, loc: Loc, lines: Lines, depth: int = 0) -> None:
    """Fill ``lines`` with the 1-based line of every mapping key and list item under ``node``."""
    if depth > 64:
        return
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (*loc, key_node.value)
                lines.setdefault(key, key_node.start_mark.line + 1)
                _record_lines(value_node, key, lines, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.setdefault((*loc, index), item.start_mark.line + 1)
            _record_lines(item, (*loc, index), lines, depth + 1)


def load_yaml(text: str, source: str) -> tuple[Any, Lines]:
    """Parse YAML text into plain data and a {loc: line} map; ConfigError on syntax errors."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_duplicates(node, (), source)
        data = loader.construct_document(node)
        lines: Lines = {}
        _record_lines(node, (), lines)  # after construction: merge keys ('<<') are flattened
        return data, lines
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()


def parse_yaml_value(text: str, what: str) -> Any:
    """One value written in YAML (``3``, ``1e-3``, ``null``, ``[1, 2]``); ConfigError naming ``what``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what}: the value is not valid YAML ({problem}); quote it if it is text.") from None


# ---------------------------------------------------------------------------------------------
# Wording helpers.


def dotted(loc: Loc) -> str:
    """``("strategies", 1, "compression")`` -> ``strategies[1].compression``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def show(value: Any) -> str:
    """A value as a user would write it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for a close match among ``choices``, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` from a type annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def is_model(annotation: Any) -> bool:
    """Whether an (unwrapped) annotation is a pydantic model class."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_at(root: type[BaseModel], loc: Loc) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of the schema field at ``loc``; (None, None) where the schema has none."""
    annotation: Any = root
    info = None
    for part in loc:
        current = unwrap(annotation)
        if is_model(current) and isinstance(part, str) and part in current.model_fields:
            info = current.model_fields[part]
            annotation = info.annotation
        elif get_origin(current) is list and isinstance(part, int):
            annotation, info = get_args(current)[0], None
        else:
            return None, None
    return annotation, info


def _choices(annotation: Any) -> list[Any]:
    """The allowed values of a Literal annotation (possibly Optional), else []."""
    current = annotation
    while get_origin(current) is Annotated:
        current = get_args(current)[0]
    if get_origin(current) in (Union, types.UnionType):
        out: list[Any] = []
        for arg in get_args(current):
            out += [None] if arg is type(None) else _choices(arg)
        return out
    return list(get_args(current)) if get_origin(current) is Literal else []


def _bounds(info: Any) -> str:
    """``">= 1"``, ``"> 0 and < 1"`` from a field's numeric constraints, else ``""``."""
    parts = []
    for meta in getattr(info, "metadata", ()):
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None) if isinstance(meta, annotated_types.BaseMetadata) else None
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return " and ".join(parts)


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a text string",
    "model_type": "a mapping of 'key: value' lines",
    "model_attributes_type": "a mapping of 'key: value' lines",
    "dict_type": "a mapping of 'key: value' lines",
    "list_type": "a list",
}


def _describe(error: dict[str, Any], loc: Loc, root: type[BaseModel]) -> tuple[str, bool]:
    """(message, names_field) for one pydantic error; names_field False means the message says where."""
    kind, value = error["type"], error.get("input")
    annotation, info = field_at(root, loc)
    parent = dotted(loc[:-1])
    if kind == "extra_forbidden":
        container = unwrap(field_at(root, loc[:-1])[0])
        allowed = list(container.model_fields) if is_model(container) else []
        where = f"in {parent}" if parent else "at the top level"
        hint = suggest(str(loc[-1]), allowed) or (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        return f"unknown key '{loc[-1]}' {where}{{where}}{hint}", False
    if kind == "missing":
        where = f"in {parent}" if parent else "at the top level"
        extra = ""
        if loc == ("strategies",):
            extra = " (the list of strategies to compare, e.g. 'strategies: [{name: fedavg}]')"
        return f"missing required key '{loc[-1]}' {where}{{where}}{extra}", False
    if kind == "literal_error":
        choices = _choices(annotation)
        listed = ", ".join(show(c) if not isinstance(c, str) else c for c in choices)
        listed = listed or error.get("ctx", {}).get("expected", "")
        hint = suggest(str(value), [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        return f"{show(value)} is not allowed; choose one of: {listed}{hint}", True
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        bounds = _bounds(info) or error.get("msg", "")
        return f"must be {bounds}, got {show(value)}", True
    if kind in _TYPE_WORDS:
        expected = _TYPE_WORDS[kind]
        bounds = _bounds(info) if kind.startswith(("int", "float")) else ""
        expected += f" {bounds}" if bounds else ""
        choices = [c for c in _choices(annotation) if c is not None]
        if choices and kind.startswith(("int", "float")):
            expected = "one of: " + ", ".join(show(c) for c in choices)
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
            hint = " (a quoted number is text in YAML: remove the quotes)"
        elif isinstance(value, float) and kind.startswith("int") and value.is_integer():
            hint = f" (write {int(value)})"
        return f"expected {expected}, got {show(value)}{hint}", True
    if kind == "too_short":
        if loc == ("strategies",):
            return "list at least one strategy, e.g. 'strategies: [{name: fedavg}]'", True
        return f"needs at least {error.get('ctx', {}).get('min_length', 1)} item(s)", True
    if kind == "string_too_short":
        return "must not be empty", True
    if kind == "string_pattern_mismatch":
        if loc[-2:] == ("model", "name"):
            return f"{show(value)} is neither a reference model name (e.g. cnn1d) nor 'package.module:Class'", True
        if loc and loc[-1] == "name":
            return f"{show(value)} may use only letters, digits, '_', '.' and '-'", True
        return f"{show(value)} does not match the pattern {error.get('ctx', {}).get('pattern')}", True
    if kind == "finite_number":
        return f"must be a finite number, got {show(value)}", True
    message = str(error.get("msg", kind))
    message = message.removeprefix("Value error, ")
    return f"{message} (got {show(value)})" if "input" in error else message, True


def _line(loc: Loc, lines: Lines) -> Union[int, str, None]:
    """The line (or ``--set`` text) of the closest enclosing located key, else None."""
    for end in range(len(loc), 0, -1):
        found = lines.get(tuple(loc[:end]))
        if found is not None:
            return found
    return None


def _where(loc: Loc, lines: Lines) -> str:
    """``"line 7"`` / ``"--set x=1"`` for the closest enclosing located key, else ``""``."""
    found = _line(loc, lines)
    return "" if found is None else f"line {found}" if isinstance(found, int) else str(found)


def _strategy_tag(loc: Loc, data: Any) -> str:
    """``"strategy 'topk'"`` when ``loc`` lies inside a named strategy of ``data``."""
    if len(loc) >= 2 and loc[0] == "strategies" and isinstance(loc[1], int) and isinstance(data, dict):
        items = data.get("strategies")
        if isinstance(items, list) and 0 <= loc[1] < len(items) and isinstance(items[loc[1]], dict):
            name = items[loc[1]].get("name")
            if isinstance(name, str) and loc[2:] != ("name",):
                return f"strategy '{name}'"
    return ""


def _expand(errors: Iterable[dict[str, Any]], prefix: Loc = ()) -> list[tuple[Loc, Any, list[Loc]]]:
    """Flatten pydantic errors (and ConfigIssues inside value errors) to (loc, error-or-text, related)."""
    out: list[tuple[Loc, Any, list[Loc]]] = []
    for error in errors:
        loc = (*prefix, *error["loc"])
        issues = error.get("ctx", {}).get("error") if error.get("type") == "value_error" else None
        if isinstance(issues, ConfigIssues):
            for at, message in issues.issues:
                if isinstance(message, dict):
                    out += [(l, m, issues.related) for l, m, _ in _expand([message], (*loc, *at))]
                else:
                    out.append(((*loc, *at), message, issues.related))
        else:
            out.append((loc, error, []))
    return out


def format_issues(
    errors: Iterable[dict[str, Any]], *, source: str, lines: Lines, data: Any, root: type[BaseModel]
) -> str:
    """The text of a ConfigError for pydantic ``errors``: one line per problem, at most a few."""
    ordered: list[tuple[float, str]] = []
    for loc, error, related in _expand(errors):
        if isinstance(error, dict):
            message, names_field = _describe(error, loc, root)
        else:
            message, names_field = str(error), True
        for other in related:
            other_where = _where(other, lines)
            if other_where and dotted(other) in message:
                message = message.replace(dotted(other), f"{dotted(other)} ({other_where})", 1)
        tags = ", ".join(t for t in (_where(loc, lines), _strategy_tag(loc, data)) if t)
        tags = f" ({tags})" if tags else ""
        if names_field:
            text = f"{dotted(loc) or 'config'}{tags}: {message}"
        else:
            text = message.replace("{where}", tags)
        line = _line(loc, lines)
        if text not in (t for _, t in ordered):
            ordered.append((line if isinstance(line, int) else float("inf"), text))
    rendered = [text for _, text in sorted(ordered, key=lambda item: item[0])]  # file order; --set last
    if len(rendered) == 1:
        return f"{source}: {rendered[0]}"
    shown = [f"  - {text}" for text in rendered[:MAX_LISTED_PROBLEMS]]
    if len(rendered) > MAX_LISTED_PROBLEMS:
        shown.append(f"  - ... and {len(rendered) - MAX_LISTED_PROBLEMS} more")
    return f"{source}: {len(rendered)} problems:\n" + "\n".join(shown)
