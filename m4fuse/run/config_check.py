"""A user's settings mistakes as one line naming the key, the value and the fix.

:func:`m4fuse.run.settings.compose` calls :func:`check_overrides` on every composed config: a
key that no config has (also through Hydra's ``+key``, which Hydra itself accepts into any
group), or a value whose type differs from the YAML default's, is refused with
:class:`ConfigError`. The YAML files of ``configs/`` are the schema of the groups without a
dataclass (``privacy`` and the top level): Hydra's struct mode refuses a plain unknown key
there but neither ``+key`` nor a value of another type, and no library checks a config
against the types of another config, hence the walk below. The ``train``, ``model``, ``fl``,
``data`` and ``tracking`` groups also have dataclass schemas (:func:`m4fuse.run.settings.
register_schemas`, :mod:`m4fuse.run.schema`); an override of ``fl``, ``data`` or
``tracking`` is checked here first, on :func:`preview_overrides` (and a named choice by
:func:`check_choices`), so its mistakes read as before those groups had a schema; Hydra's
own errors are turned into the same one line by :func:`hydra_message`.

Tracebacks are for the project's own bugs: set ``M4FUSE_DEBUG=1`` (:data:`DEBUG_ENV`) to see
one behind a refused setting too.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Set to 1 to keep the traceback behind a one-line error (commands, ServerApp).
DEBUG_ENV = "M4FUSE_DEBUG"


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key, the value and the fix."""


def debug_enabled() -> bool:
    """Whether ``$M4FUSE_DEBUG`` asks for tracebacks (any value but empty/0/false/no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def override_key(override: str) -> str:
    """The dotted key of a Hydra override: ``"+fl.faults.a=1"`` -> ``"fl.faults.a"``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()


def is_group_choice(override: str, config_dir: Path) -> bool:
    """Whether ``override`` picks a config group's option (``data=brats``, ``+privacy=dp``)."""
    key = override_key(override)
    return "=" in override and "." not in key and (config_dir / key).is_dir()


def _close(word: str, choices: Sequence[str], parent: str = "") -> str:
    """"; did you mean <parent>.<closest choice>?" (difflib), or "" when none is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {parent + '.' if parent else ''}{match[0]}?" if match else ""


def _keys_of(tree: Any, path: str) -> list[str]:
    """The keys of the mapping at dotted ``path`` of ``tree`` ([] when there is none)."""
    node = tree
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    return [str(k) for k in node] if isinstance(node, Mapping) else []


def _where(path: str, config_dir: Path) -> str:
    group = path.split(".", 1)[0]
    return f"configs/{group}/" if (config_dir / group).is_dir() else "configs/config.yaml"


def _kind(value: Any) -> str | None:
    """The type a default asks for: bool, int, float, str, list, dict (None: anything)."""
    if value is None or value == "???":
        return None
    for name, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return name
    if isinstance(value, Sequence):
        return "list"
    if isinstance(value, Mapping):
        return "dict"
    return None


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a text", "list": "a list [a,b,...]", "dict": "a mapping {k: v}"}


def _fits(value: Any, kind: str | None) -> bool:
    if kind is None or value is None:
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, Sequence) and not isinstance(value, str)
    return isinstance(value, Mapping)


def _source_override(path: str, overrides: Sequence[str]) -> str | None:
    """The override that set ``path`` (itself, or a mapping above it), if any."""
    for override in reversed(list(overrides)):
        key = override_key(override)
        if path == key or path.startswith(key + "."):
            return override
    return None


def check_overrides(final: Mapping[str, Any], base: Mapping[str, Any],
                    overrides: Sequence[str], config_dir: Path,
                    schema_keys: Mapping[str, Collection[str]] | None = None) -> None:
    """Refuse (:class:`ConfigError`) what ``overrides`` put into the composed config
    ``final`` that the configs do not have: a key absent from ``base`` (the same config
    composed with the group choices only), unless it lies inside a mapping that is empty in
    ``base`` (an open map such as ``fl.faults``), and a value whose type is not that of the
    default in ``base`` (an int where a float is expected is fine; null is always allowed;
    a default of null or ``???`` takes anything). ``schema_keys`` (``{group: keys}``, default
    none) are keys a group's dataclass has beyond its YAML, which ``+group.key`` may add (e.g.
    ``+train.betas``: a :class:`m4fuse.training.engine.TrainConfig` field). Both configs as plain
    containers."""
    extra = {group: set(keys) for group, keys in (schema_keys or {}).items()}

    def walk(node: Any, default: Any, path: str) -> None:
        if isinstance(default, Mapping):
            if not default and path:  # an open map ({} in the YAML): any keys
                return
            if not isinstance(node, Mapping):
                _wrong_type(path, node, default)
            for key, value in node.items():
                sub = f"{path}.{key}" if path else str(key)
                if key not in default and key in extra.get(path, ()):
                    continue  # a field of the group's dataclass schema, added with '+'
                if key not in default:
                    source = _source_override(sub, overrides) or sub
                    hint = _close(str(key), [str(k) for k in default], path)
                    raise ConfigError(
                        f"{source}: no config has the key {sub}{hint} (the keys of "
                        f"{path or 'the top level'} are in {_where(sub, config_dir)}; '+' "
                        "adds keys only to the open maps such as fl.faults)")
                walk(value, default[key], sub)
            return
        kind = _kind(default)
        if not _fits(node, kind):
            _wrong_type(path, node, default)
        if kind == "list" and default and node is not None:
            element = _kind(default[0])
            if all(_kind(d) == element for d in default):
                for i, item in enumerate(node):
                    if not _fits(item, element):
                        _wrong_type(f"{path}.{i}", item, default[0])

    def _wrong_type(path: str, value: Any, default: Any) -> None:
        source = _source_override(path, overrides) or f"{path}={value!r}"
        kind = _kind(default)
        raise ConfigError(f"{source}: {path} takes {_KIND_WORDS.get(kind or '', 'another type')}"
                          f", got {value!r} ({type(value).__name__}); its default is "
                          f"{default!r} ({_where(path, config_dir)})")

    walk(final, base, "")


_QUOTED = re.compile(r"'([^']+)'")


def hydra_message(err: BaseException, overrides: Sequence[str], base: Mapping[str, Any] | None,
                  config_dir: Path) -> str:
    """Hydra's composition error ``err`` as one line naming the override, the key and the
    fix (``base``: the config composed without ``overrides``, for suggestions)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    quoted = _QUOTED.findall(first)
    key = quoted[0] if quoted else ""
    source = _source_override(key, overrides) if key else None
    if first.startswith("Could not override"):
        parent, _, leaf = key.rpartition(".")
        hint = _close(leaf, _keys_of(base, parent), parent) if base is not None else ""
        return (f"{source or key}: no config has the key {key}{hint} (the keys are in "
                f"{_where(key, config_dir)})")
    if first.startswith("Could not append to config"):
        return (f"{source or key}: {key} exists already: set it without the '+' "
                f"({override_key(source or key)}=...)")
    if first.startswith("Error merging override"):
        bad = first.removeprefix("Error merging override").strip()
        cause = err.__cause__ or err.__context__
        why = str(cause).strip().splitlines()[0] if cause else "a value of the wrong type"
        return f"{bad}: {why} (the key's type is in {_where(override_key(bad), config_dir)})"
    if type(err).__name__ == "MissingConfigException":
        options = [line.strip() for line in text.splitlines()
                   if line.startswith("\t") and "=" not in line]
        choice = next((o for o in overrides if is_group_choice(o, config_dir)
                       and f"'{override_key(o)}/" in first), None)
        return (f"{choice or first}: no such config option (options: "
                f"{', '.join(options) or 'see configs/'})")
    if type(err).__name__ == "OverrideParseException":
        bad = next((o for o in overrides if o and _QUOTED.findall(first)
                    and any(q in o for q in _QUOTED.findall(first))), None)
        return (f"{bad or 'an override'}: not a valid Hydra override ({first}); write "
                "key=value, lists as [a,b], quote values with spaces")
    return first


def preview_overrides(base: Mapping[str, Any], overrides: Sequence[str],
                      config_dir: Path) -> dict[str, Any]:
    """``base`` (a plain container) with the values of ``overrides`` set, as Hydra would
    merge them, so that :func:`check_overrides` can refuse a bad key or type in the words of
    the configs before Hydra's schemas see the value. Group choices, deletions and
    ``key@package`` overrides are left out (Hydra's own messages cover them)."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser

    final = copy.deepcopy(dict(base))
    for parsed in OverridesParser.create().parse_overrides(list(overrides)):
        if (parsed.is_delete() or parsed.package is not None
                or is_group_choice(parsed.input_line, config_dir)):
            continue
        *parents, leaf = parsed.key_or_group.split(".")
        node: Any = final
        for part in parents:
            if not isinstance(node, dict):
                break
            node = node.setdefault(part, {})
        if isinstance(node, dict):
            node[leaf] = parsed.value()
    return final


def check_choices(overrides: Sequence[str], config_dir: Path,
                  choices_of: Callable[[str], Collection[str] | None]) -> None:
    """Refuse an override that gives a named choice (``choices_of(key)``: its words, None
    for a key that is not a choice) a word it does not have, naming the key, the value and
    the words (null is left to the schema: allowed where the key is optional)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for parsed in OverridesParser.create().parse_overrides(list(overrides)):
        if parsed.is_delete() or is_group_choice(parsed.input_line, config_dir):
            continue
        words = choices_of(parsed.key_or_group)
        value = parsed.value()
        if words is not None and value is not None and value not in words:
            raise ConfigError(f"{parsed.input_line}: {parsed.key_or_group} must be one of "
                              f"{sorted(words)}, got {value!r} "
                              f"({_where(parsed.key_or_group, config_dir)})")
