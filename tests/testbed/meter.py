"""Byte accounting of every ssh connection the control machine and the simulated hosts make.

`ssh` on both (hostbin/ssh) carries each new connection through hostbin/ssh-meter, which keeps a
record file per connection in a meter folder: the control machine's, and one per host. A record
names the address the connection came from (the source's bound CX7 address, as `ssh -o
BindAddress` makes it, else the host's management address, else "control") and the address it
reached, with the bytes sent and received so far, so a test sees who sent how many bytes to whom.
"""
import json
from pathlib import Path

CONTROL = "control"


class Meter:
    def __init__(self, folders):
        self.folders = [Path(f) for f in folders]
        self.baseline = {}

    def records(self):
        found = {}
        for folder in self.folders:
            for path in folder.glob("*.json"):
                try:
                    found[path] = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # being replaced right now
        return found

    def reset(self):
        """Count from now on: open connections (an ssh master that later commands reuse) from
        what they have carried so far."""
        self.baseline = {path: (r["sent"], r["received"]) for path, r in self.records().items()}

    def transfers(self):
        """Connections that carried bytes since the last reset: dicts with from, to, sent, received."""
        out = []
        for path, record in self.records().items():
            sent, received = self.baseline.get(path, (0, 0))
            record = dict(record, sent=record["sent"] - sent, received=record["received"] - received)
            if record["sent"] or record["received"]:
                out.append(record)
        return out
