"""A protobuf text-format parser, as far as Caffe ``.prototxt`` network files need.

``parse_prototxt(text)`` returns a :class:`Message`: every field name maps to the list of its
values (fields may repeat), values being ``int``, ``float``, ``str`` (quoted strings, enum
names, booleans as ``true``/``false``) or nested :class:`Message` objects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from advpurify.weights.registry import WeightsError

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<sym>[{}<>:;,\[\]])"""
    r"""|(?P<word>[A-Za-z0-9_.+\-]+)"""
)


class PrototxtError(WeightsError):
    """A prototxt file that does not parse."""


class Message(dict):
    """Field name -> list of values; helpers for the common single-value case."""

    def get1(self, name: str, default: Any = None) -> Any:
        values = self.get(name)
        return values[0] if values else default

    def all(self, name: str) -> list[Any]:
        return list(self.get(name, []))


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            line = text.count("\n", 0, pos) + 1
            raise PrototxtError(f"line {line}: unexpected character {text[pos]!r}")
        pos = match.end()
        if match.lastgroup:
            tokens.append(match.group(match.lastgroup))
    return tokens


def _scalar(token: str) -> Any:
    if token[0] in "\"'":
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return token  # an enum name or a boolean


def parse_prototxt(text: str) -> Message:
    tokens = _tokens(text)
    pos = 0

    def message(closing: str | None) -> Message:
        nonlocal pos
        msg = Message()
        while pos < len(tokens):
            token = tokens[pos]
            if token in ("}", ">"):
                if closing != token:
                    raise PrototxtError(f"unbalanced {token!r}")
                pos += 1
                return msg
            if token in (";", ","):
                pos += 1
                continue
            name = token
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos >= len(tokens):
                raise PrototxtError(f"field {name}: missing value")
            value_token = tokens[pos]
            if value_token in ("{", "<"):
                pos += 1
                value: Any = message("}" if value_token == "{" else ">")
            elif value_token == "[":  # short form of a repeated scalar: dim: [1, 3]
                pos += 1
                while tokens[pos] != "]":
                    if tokens[pos] != ",":
                        msg.setdefault(name, []).append(_scalar(tokens[pos]))
                    pos += 1
                pos += 1
                continue
            else:
                pos += 1
                value = _scalar(value_token)
            msg.setdefault(name, []).append(value)
        if closing is not None:
            raise PrototxtError(f"missing {closing!r} at end of file")
        return msg

    return message(None)


def read_prototxt(path: Path | str) -> Message:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise WeightsError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise WeightsError(
            f"{path}: not a text prototxt (not UTF-8 at byte {error.start})"
        ) from None
    try:
        return parse_prototxt(text)
    except (PrototxtError, IndexError) as error:
        raise PrototxtError(f"{path}: not a valid prototxt ({error or 'unexpected end'})") from None
