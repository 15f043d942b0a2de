"""A tiny TCP membership protocol standing in for torch.distributed / Ray GCS.

Members send one JSON line {"op": "join", ...} and keep the connection
open; the server answers "ok" and a JSON line (its welcome: what the head
advertises) and counts live members. {"op": "status"} returns the list.
{"op": "tell", "to": {key: value}, "message": {...}} passes a JSON line to
the members whose join request matches `to` (a Ray driver reaching the
worker processes on each node).
"""
import json
import socket
import threading
import time

from .common import bind_addresses, die, log, real_addr


class Membership:
    """Listens on (addr, port) — and the host's InfiniBand aliases — and tracks members."""

    def __init__(self, addr, port, welcome=None):
        self.members = {}
        self.streams = {}
        self.welcome = welcome or {}
        self.changed = threading.Condition()
        self.socks = []
        for bind in bind_addresses(addr):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind, port))
            except OSError as exc:
                die(f"ERROR: could not bind {bind}:{port}: {exc}")
            sock.listen(64)
            self.socks.append(sock)

    def start(self):
        """Start accepting members (after any fork)."""
        for sock in self.socks:
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, sock):
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rw") as stream:
            try:
                request = json.loads(stream.readline() or "{}")
            except ValueError:
                return
            if request.get("op") == "status":
                stream.write(json.dumps({"members": list(self.members.values())}) + "\n")
                return
            if request.get("op") == "tell":
                self._tell(request.get("to") or {}, request.get("message"))
                return
            if request.get("op") != "join":
                return
            with self.changed:
                self.members[id(conn)] = request
                self.streams[id(conn)] = stream
                stream.write("ok\n" + json.dumps(self.welcome) + "\n")
                stream.flush()
                self.changed.notify_all()
            log(f"member joined: {request.get('host')} ({len(self.members)} connected)")
            while stream.readline():
                pass
            with self.changed:
                del self.members[id(conn)], self.streams[id(conn)]
                self.changed.notify_all()
            log(f"member left: {request.get('host')}")

    def _tell(self, to, message):
        with self.changed:
            for key, request in self.members.items():
                if all(request.get(k) == v for k, v in to.items()):
                    self.streams[key].write(json.dumps(message) + "\n")
                    self.streams[key].flush()

    def wait_for(self, count, timeout):
        """Wait until `count` members are connected; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.members) >= count, timeout)


class Link:
    """A member's connection: the head's welcome, then the messages it passes on."""

    def __init__(self, sock, stream, welcome):
        self.sock, self.stream, self.welcome = sock, stream, welcome

    def messages(self):
        """JSON messages from the head until it goes away."""
        for line in self.stream:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def join(addr, port, info, timeout):
    """Connect to a Membership server (retrying) and register; returns a Link, or None."""
    target = real_addr(addr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((target, port), timeout=2)
            sock.sendall((json.dumps(dict(info, op="join")) + "\n").encode())
            stream = sock.makefile()
            if stream.readline().strip() == "ok":
                welcome = json.loads(stream.readline() or "{}")
                sock.settimeout(None)
                return Link(sock, stream, welcome)
            sock.close()
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def wait_closed(link):
    """Block until the head closes the connection."""
    for _ in link.messages():
        pass


def tell(addr, port, to, message, timeout=3):
    """Pass `message` through the server at addr:port to the members matching `to`."""
    with socket.create_connection((real_addr(addr), port), timeout=timeout) as sock:
        sock.sendall((json.dumps({"op": "tell", "to": to, "message": message}) + "\n").encode())


def status(addr, port, timeout=3):
    """Members of the server at addr:port, or None if unreachable."""
    try:
        with socket.create_connection((real_addr(addr), port), timeout=timeout) as sock:
            sock.sendall(b'{"op": "status"}\n')
            return json.loads(sock.makefile().readline())["members"]
    except (OSError, ValueError, KeyError):
        return None
