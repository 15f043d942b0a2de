"""Byte accounting of every ssh connection to the simulated hosts.

Each host's sshd listens on SSHD_PORT; the bed listens on port 22 of each of the host's addresses
(management and CX7) and relays every connection to that sshd, counting the bytes each way. A
connection's record names the address it came from (the control machine connects from
127.0.0.1; a host that binds its own CX7 address, as `ssh -o BindAddress` does, from that
address) and the address it reached, so a test sees who sent how many bytes to whom.
"""
import socket
import threading

SSHD_PORT = 2222
CHUNK = 1 << 20


class Connection:
    """One relayed connection: `sent` counts client -> host bytes, `received` host -> client."""

    def __init__(self, source, target):
        self.source, self.target = source, target
        self.sent = 0
        self.received = 0
        self.open_directions = 2

    def as_dict(self):
        return {"from": self.source, "to": self.target, "sent": self.sent, "received": self.received}


class Meter:
    """Listeners on (address, 22) relaying to (address, SSHD_PORT), with a record per connection."""

    def __init__(self):
        self.connections = []
        self.listeners = []
        self.lock = threading.Lock()

    def listen(self, address):
        server = socket.create_server((address, 22), reuse_port=False, backlog=128)
        self.listeners.append(server)
        threading.Thread(target=self._accept, args=(server, address), daemon=True).start()

    def _accept(self, server, address):
        while True:
            try:
                client, (source, _port) = server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((address, SSHD_PORT), timeout=5)
            except OSError:
                client.close()  # sshd is down: the client sees the connection closed
                continue
            upstream.settimeout(None)
            record = Connection(source, address)
            with self.lock:
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, record, "received"), daemon=True).start()

    def _pump(self, src, dst, record, field):
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        try:
            while n := src.recv_into(buffer):
                dst.sendall(view[:n])
                setattr(record, field, getattr(record, field) + n)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self.lock:
            record.open_directions -= 1
            done = record.open_directions == 0
        if done:
            src.close()
            dst.close()

    def reset(self):
        with self.lock:
            self.connections = []

    def transfers(self):
        """Every connection since the last reset: dicts with from, to, sent, received."""
        with self.lock:
            return [c.as_dict() for c in self.connections]

    def close(self):
        for server in self.listeners:
            server.close()
        self.listeners = []
