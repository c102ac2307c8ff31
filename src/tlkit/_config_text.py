"""Reading config text that may come from anyone: YAML (a safe subset) or JSON into plain data.

Bounded before pydantic sees anything: size, node count and nesting depth (alias bombs,
stack-deep nesting), only the YAML types JSON also has, repeated keys refused, and every
failure one `ConfigError` naming the file, line and column. `tlkit.config.RunConfig.from_file`
and ``--set`` values read through here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "MAX_CONFIG_BYTES", "parse_json", "parse_yaml", "read_config_text"]


class ConfigError(ValueError):
    """A config file (or a ``--set`` value) that cannot be read as a YAML/JSON mapping.

    The message starts with the file path (or the override) and, for syntax errors, names the
    line and column: ``run.yaml: line 3, column 9: expected ',' or ']', but got '<stream end>'``.
    """


# Reading config text that may come from anyone. A config is a few hundred YAML nodes (a
# 22k-class list is ~22k); the limits only stop alias bombs ("billion laughs") and stack-deep
# nesting before they reach pydantic or ``to_file``.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_MAX_NODES = 200_000
_MAX_DEPTH = 32
# The YAML types JSON also has (plus merge keys): dates, sets and binary are no config values.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}


def _at(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _check_yaml_node(node: yaml.Node, source: str) -> None:
    """Refuse a non-plain tag or a repeated key in one node (``source`` starts the message).

    Raises:
        ConfigError: naming the line and column.
    """
    if node.tag not in _PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(f"{source}: {_at(node.start_mark)}unsupported YAML tag or type {tag!r}: configs hold strings, "
                          "numbers, booleans, null, lists and mappings only (quote a value to make it a string)")
    if isinstance(node, yaml.MappingNode):
        # safe_load keeps the last of repeated keys silently: "epochs: 3 ... epochs: 30" would train 30.
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{source}: {_at(key.start_mark)}key {key.value!r} repeats "
                                      f"(first at line {seen[key.tag, key.value].line + 1})")
                seen[key.tag, key.value] = key.start_mark


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_yaml_tree(root: yaml.Node, source: str) -> None:
    """Check every node, and the tree's size with aliases expanded, without expanding it.

    Raises:
        ConfigError: a bad node, a recursive alias, more than 200,000 nodes once aliases are
            expanded, or nesting deeper than 32 levels.
    """
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    open_ids: set[int] = set()  # the current path from the root: an alias back to it is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: a deep document must not exhaust Python's stack
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_ids.discard(key)
            subs = [done[id(c)] for c in _yaml_children(node)]
            size, height = 1 + sum(s for s, _ in subs), 1 + max((h for _, h in subs), default=0)
            if size > _MAX_NODES or height > _MAX_DEPTH:
                what = (f"more than {_MAX_NODES} values (with aliases expanded)" if size > _MAX_NODES
                        else f"nested deeper than {_MAX_DEPTH} levels")
                raise ConfigError(f"{source}: {_at(node.start_mark)}{what}")
            done[key] = (size, height)
        elif key in open_ids:
            raise ConfigError(f"{source}: {_at(node.start_mark)}recursive alias (a value that contains itself)")
        elif key not in done:
            _check_yaml_node(node, source)
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _yaml_children(node))


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text``, after checking its node tree; every failure one `ConfigError`.

    Args:
        text: the YAML document.
        source: what starts each error message: the file path, or the ``--set`` item.

    Raises:
        ConfigError: a syntax error, an unsupported tag (``!!python/object``, ``!foo``, dates),
            a repeated key, a recursive alias, more than 200,000 values with aliases expanded,
            or nesting deeper than 32 levels; the message names line and column.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_yaml_tree(root, source)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        where = _at(e.problem_mark or e.context_mark)
        context = f" ({e.context} at {_at(e.context_mark)[:-2]})" if e.context and e.context_mark else ""
        raise ConfigError(f"{source}: {where}{e.problem or e.context}{context}") from None
    except yaml.reader.ReaderError as e:  # a control character: marked by offset only
        before = text[: e.position]
        line, column = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        raise ConfigError(f"{source}: line {line}, column {column}: control character U+{e.character:04X} "
                          "is not allowed in YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from None
    except ConfigError:
        raise
    except ValueError as e:  # a constructor's own check, e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:  # the composer recurses once per nesting level
        raise ConfigError(f"{source}: nested deeper than {_MAX_DEPTH} levels") from None


def parse_json(text: str, source: str) -> Any:
    """``json.loads`` with repeated keys refused; every failure one `ConfigError`."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):  # json.loads would keep the last value silently
            key = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            raise ConfigError(f"{source}: key {key!r} repeats")
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an integer with more than 4300 digits
        raise ConfigError(f"{source}: {e}") from None


def read_config_text(path: Path) -> str:
    """The file's text, UTF-8 (a leading byte-order mark is dropped).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: a directory, unreadable, over `MAX_CONFIG_BYTES`, or not UTF-8 (names the
            line and column of the first bad byte).
    """
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        line, column = before.count(b"\n") + 1, e.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError(f"{path}: line {line}, column {column}: not UTF-8 text "
                          f"(byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


