"""A small subset of Go templates as used in `docker --format` strings.

Supported: {{json .}}, {{json .A.B}}, {{.A.B}}, {{index .A "key"}},
{{.Label "key"}} (ps), and the `table` prefix.
"""
import json
import re

TOKEN = re.compile(r"{{-?\s*(.*?)\s*-?}}")
WORDS = re.compile(r'"[^"]*"|\S+')


class TemplateError(Exception):
    pass


def _lookup(obj, path):
    for part in filter(None, path.split(".")):
        if not isinstance(obj, dict):
            raise TemplateError(f"can't evaluate field {part}")
        if part not in obj:
            return "<no value>"
        obj = obj[part]
    return obj


def _evaluate(words, obj, funcs):
    head, args = words[0], [w.strip('"') for w in words[1:]]
    if head == "json":
        return _Raw(json.dumps(_evaluate(words[1:], obj, funcs), separators=(",", ":")))
    if head == "index" and len(words) == 3:
        container = _evaluate(words[1:2], obj, funcs)
        return container.get(args[1], "<no value>") if isinstance(container, dict) else "<no value>"
    if head.startswith(".") and head[1:] in funcs:
        return funcs[head[1:]](*args)
    if head.startswith(".") and not args:
        return _lookup(obj, head)
    raise TemplateError(f'function "{head}" not defined')


class _Raw(str):
    """Already formatted text (json output)."""


def to_text(value):
    """Format a value the way Go's text/template prints it."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<nil>"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{to_text(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, list):
        return "[" + " ".join(to_text(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render(fmt, obj, funcs=None):
    """Render one object; raise TemplateError for unsupported templates."""
    fmt = fmt.replace("\\t", "\t").replace("\\n", "\n")
    return TOKEN.sub(lambda m: to_text(_evaluate(WORDS.findall(m.group(1)) or ["."],
                                                   obj, funcs or {})), fmt)


def table_header(fmt, headers):
    """Header line for a 'table ...' format; headers maps field -> title."""
    fmt = fmt.replace("\\t", "\t").replace("\\n", "\n")
    return TOKEN.sub(lambda m: headers.get(m.group(1).lstrip("."), m.group(1).lstrip(".").upper()),
                     fmt)
