"""Command-line flag parsing with docker's (cobra's) error messages."""


class ArgError(Exception):
    pass


def spec(bools="", values="", lists=""):
    """Build a flag table. Each space-separated group lists aliases: 'd,detach'."""
    table = {}
    for kind, text in (("bool", bools), ("value", values), ("list", lists)):
        for group in text.split():
            names = group.split(",")
            key = max(names, key=len).replace("-", "_")
            for name in names:
                table[("-" if len(name) == 1 else "--") + name] = (key, kind)
    return table


def _store(opts, key, kind, value):
    if kind == "list":
        opts.setdefault(key, []).append(value)
    elif kind == "bool":
        opts[key] = value not in ("false", "0")
    else:
        opts[key] = value


def parse(argv, table, interspersed=True):
    """Return (opts, positionals). With interspersed=False flags end at the
    first positional (everything after it is positional, as for `run`)."""
    opts = {key: ([] if kind == "list" else None if kind == "value" else False)
            for key, kind in table.values()}
    pos, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return opts, pos + argv[i:]
        if not arg.startswith("-") or arg == "-":
            pos.append(arg)
            if not interspersed:
                return opts, pos + argv[i:]
            continue
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in table:
                raise ArgError(f"unknown flag: {name}")
            key, kind = table[name]
            if kind != "bool" and not eq:
                if i >= len(argv):
                    raise ArgError(f"flag needs an argument: {name}")
                value, i = argv[i], i + 1
            _store(opts, key, kind, value if eq or kind != "bool" else "true")
            continue
        for j, char in enumerate(arg[1:], start=1):
            if "-" + char not in table:
                raise ArgError(f"unknown shorthand flag: '{char}' in {arg}")
            key, kind = table["-" + char]
            if kind == "bool":
                _store(opts, key, kind, "true")
                continue
            value = arg[j + 1:].removeprefix("=")
            if not value:
                if i >= len(argv):
                    raise ArgError(f"flag needs an argument: '{char}' in {arg}")
                value, i = argv[i], i + 1
            _store(opts, key, kind, value)
            break
    return opts, pos
