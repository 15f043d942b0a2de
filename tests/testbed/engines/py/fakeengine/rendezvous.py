"""A tiny TCP membership protocol standing in for torch.distributed / Ray GCS.

Members send one JSON line {"op": "join", ...} and keep the connection
open; the server counts live members. {"op": "status"} returns the list.
"""
import json
import socket
import threading
import time

from .common import bind_addresses, die, log, real_addr


class Membership:
    """Listens on (addr, port) — and the host's InfiniBand aliases — and tracks members."""

    def __init__(self, addr, port):
        self.members = {}
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
            if request.get("op") != "join":
                return
            with self.changed:
                self.members[id(conn)] = request
                self.changed.notify_all()
            log(f"member joined: {request.get('host')} ({len(self.members)} connected)")
            stream.write("ok\n")
            stream.flush()
            while stream.readline():
                pass
            with self.changed:
                del self.members[id(conn)]
                self.changed.notify_all()
            log(f"member left: {request.get('host')}")

    def wait_for(self, count, timeout):
        """Wait until `count` members are connected; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.members) >= count, timeout)


def join(addr, port, info, timeout):
    """Connect to a Membership server (retrying) and register; returns the socket."""
    target = real_addr(addr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((target, port), timeout=2)
            sock.sendall((json.dumps(dict(info, op="join")) + "\n").encode())
            if sock.makefile().readline().strip() == "ok":
                sock.settimeout(None)
                return sock
            sock.close()
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def wait_closed(sock):
    """Block until the peer closes the connection."""
    while sock.recv(1024):
        pass


def status(addr, port, timeout=3):
    """Members of the server at addr:port, or None if unreachable."""
    try:
        with socket.create_connection((real_addr(addr), port), timeout=timeout) as sock:
            sock.sendall(b'{"op": "status"}\n')
            return json.loads(sock.makefile().readline())["members"]
    except (OSError, ValueError, KeyError):
        return None
