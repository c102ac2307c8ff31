"""Showing untrusted strings (class names, file names) on a terminal, in CSV or on a web page.

Class names come from folder names or from a stranger's checkpoint header, file names from a
downloaded archive: either may hold terminal escape sequences (``\\x1b[2J`` clears the screen,
OSC 8 fakes links) or start a spreadsheet formula (``=HYPERLINK(...)``). JSON output needs none
of this: ``json.dumps`` escapes every control character and keeps the exact value.
"""

from __future__ import annotations

import re

__all__ = ["escape_control", "csv_cell", "markdown_text"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# OWASP's CSV-injection list: a spreadsheet reads a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>&~\"'$=:])")


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_control(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character written as its Python escape, as text.

    Non-printable is ``str.isprintable() == False``: C0/C1 controls (ESC, BEL, CR, ...), format
    characters such as the right-to-left override U+202E, and separators other than the space.
    ``"a\\x1b[31mb"`` becomes ``"a\\\\x1b[31mb"`` (a backslash, then ``x1b``).

    Args:
        text: the untrusted string.
        keep: characters left as they are (e.g. ``"\\n"`` for a multi-line message).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def csv_cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text and a terminal prints harmlessly.

    A cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading ``'``
    (OWASP's advice against CSV injection); then control characters are escaped as in
    `escape_control`. Only for text cells: numbers are written as they are.
    """
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return escape_control(text)


def markdown_text(text: str) -> str:
    """``text`` shown literally inside Markdown: punctuation backslash-escaped, controls escaped.

    Stops a class name such as ``![x](http://tracker/pixel)`` or ``<img onerror=...>`` from
    becoming an image, link or HTML on the demo page.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", escape_control(text))
