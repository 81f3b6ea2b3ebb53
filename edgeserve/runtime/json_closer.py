"""The shortest text that turns a prefix of a JSON value into a complete one.

A structured answer (`response_format: json_object`) is sampled under llama.cpp's JSON grammar,
so whatever has been generated is always a prefix of valid JSON. When its token budget or its
deadline runs out, the answer is finished with `closing(prefix)` instead of being cut: open
strings, escapes, numbers and literals are completed, a value a key is waiting for becomes
`null`, and open arrays and objects are closed. The client gets JSON that parses, and the
`edgeserve` object says the structure was closed early. Pure: no model, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_LITERALS = ("true", "false", "null")


def json_object_grammar() -> str:
    """llama.cpp's JSON grammar (its root is an object), as llama-cpp-python ships it."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


@dataclass
class _State:
    stack: list[str] = field(default_factory=list)  # "{" or "["
    in_string: bool = False
    escape: int = 0  # 0: none; 1: after a backslash; 2..5: inside \uXXXX (hex digits still to come + 1)
    is_key: bool = False  # the open string is an object key
    expect: str = "value"  # value | key_or_end | key | colon | comma_or_end | done
    token: str = ""  # a number or literal being written


def _scan(prefix: str) -> _State:
    state = _State()
    for char in prefix:
        if state.in_string:
            _string_char(state, char)
        elif state.token and (char.isalnum() or char in "+-."):
            state.token += char
        else:
            if state.token:
                state.token = ""
                state.expect = "comma_or_end" if state.stack else "done"
            _structural(state, char)
    return state


def _string_char(state: _State, char: str) -> None:
    if state.escape == 1:
        state.escape = 5 if char == "u" else 0
    elif state.escape > 1:
        state.escape = 0 if state.escape == 2 else state.escape - 1
    elif char == "\\":
        state.escape = 1
    elif char == '"':
        state.in_string = False
        state.expect = "colon" if state.is_key else ("comma_or_end" if state.stack else "done")


def _structural(state: _State, char: str) -> None:
    if char.isspace():
        return
    if char in "{[":
        state.stack.append(char)
        state.expect = "key_or_end" if char == "{" else "value_or_end"
    elif char in "}]":
        state.stack.pop()
        state.expect = "comma_or_end" if state.stack else "done"
    elif char == '"':
        state.in_string = True
        state.is_key = state.expect in ("key", "key_or_end")
    elif char == ":":
        state.expect = "value"
    elif char == ",":
        state.expect = "key" if state.stack[-1] == "{" else "value"
    else:  # the first character of a number or a literal
        state.token = char


def _finish_token(token: str) -> str:
    """What a number or literal in progress still needs."""
    for literal in _LITERALS:
        if literal.startswith(token):
            return literal[len(token):]
    if token[-1] in "-+.eE":
        return "0"
    return ""


def closing(prefix: str) -> str:
    """The shortest suffix that makes `prefix` (a prefix of a JSON value, as a JSON grammar
    lets a model write it) one complete JSON value; "" when it already is one. An empty prefix
    gets `{}` (the grammar's root is an object)."""
    state = _scan(prefix)
    if not prefix.strip():
        return "{}"
    out = ""
    if state.in_string:
        if state.escape == 1:
            out += "n"
        elif state.escape > 1:
            out += "0" * (state.escape - 1)
        out += '"'
        state.expect = "colon" if state.is_key else "comma_or_end"
    elif state.token:
        out += _finish_token(state.token)
        state.expect = "comma_or_end"
    if state.expect == "colon":
        out += ":null"
    elif state.expect == "key":
        out += '"":null'
    elif state.expect == "value":
        out += "null"
    for opener in reversed(state.stack):
        out += "}" if opener == "{" else "]"
    return out
