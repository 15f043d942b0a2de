"""Shared helpers: errors, time/size formatting, output tables, format flags."""
import sys
import time

from . import template


class DockerError(Exception):
    """An error printed to stderr, ending the command with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def daemon_error(message, code=1):
    return DockerError(f"Error response from daemon: {message}", code)


def iso_time(epoch):
    if not epoch:
        return "0001-01-01T00:00:00Z"
    frac = f"{epoch % 1:.9f}"[2:]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{frac}Z"


def created_at(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(epoch))


def human_duration(seconds):
    """Docker's units.HumanDuration."""
    s = int(seconds)
    minutes, hours = round(seconds / 60), round(seconds / 3600)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"


def ago(epoch):
    return human_duration(time.time() - epoch) + " ago"


def human_size(size):
    """Docker's units.HumanSizeWithPrecision(size, 3) (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.3g}{unit}"
        size /= 1000
    return ""


def print_table(rows):
    """Print rows (lists of str) aligned like docker's tabwriter (padding 3)."""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows)
              for i in range(max(len(r) for r in rows))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
        print("   ".join(cells).rstrip())


def print_formatted(objs, fmt, headers, funcs=None):
    """Print objects with a --format string (supports the 'table ' prefix)."""
    funcs = funcs or (lambda obj: {})
    try:
        if fmt.startswith("table"):
            body = fmt[5:].strip() or "\t".join(f"{{{{.{k}}}}}" for k in headers)
            lines = [template.table_header(body, headers)]
            lines += [template.render(body, o, funcs(o)) for o in objs]
            print_table([line.split("\t") for line in lines])
            return
        out = [template.render(fmt, o, funcs(o)) for o in objs]
    except template.TemplateError as exc:
        raise DockerError(f"template parsing error: {exc}") from exc
    if out:
        sys.stdout.write("\n".join(out) + "\n")
