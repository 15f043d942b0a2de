#!/usr/bin/python3 -S
"""Fake `ip` (iproute2) answering from $TESTBED_STATE/facts/net.json.

Supports: [-o] [-4] [-j] [-br] addr|link show [dev X], route get ADDR.
"""
import ipaddress
import json
import os
import sys

FLAGS = {"-o": "oneline", "-oneline": "oneline", "-4": "v4", "-j": "json", "-json": "json",
         "-br": "brief", "-brief": "brief", "-p": "pretty", "-pretty": "pretty",
         "-d": "details", "-s": "stats", "-6": "v6"}


def interfaces():
    path = os.path.join(os.environ.get("TESTBED_STATE", "/nonexistent"), "facts", "net.json")
    with open(path) as f:
        return json.load(f)


def header(nic):
    flags = "LOOPBACK,UP,LOWER_UP" if nic["ifname"] == "lo" else (
        "BROADCAST,MULTICAST,UP,LOWER_UP" if nic["state"] == "UP" else "BROADCAST,MULTICAST")
    state = "UNKNOWN" if nic["ifname"] == "lo" else nic["state"]
    return (f"{nic['ifindex']}: {nic['ifname']}: <{flags}> mtu {nic['mtu']} qdisc mq "
            f"state {state} group default qlen 1000")


def inet_line(nic):
    scope = "host" if nic["ifname"] == "lo" else "global"
    net = ipaddress.ip_interface(f"{nic['ipv4']}/{nic['prefix']}").network
    brd = "" if nic["ifname"] == "lo" else f"brd {net.broadcast_address} "
    return f"inet {nic['ipv4']}/{nic['prefix']} {brd}scope {scope} {nic['ifname']}"


def addr_json(nic, with_addr=True):
    info = {"ifindex": nic["ifindex"], "ifname": nic["ifname"], "mtu": nic["mtu"],
            "operstate": "UNKNOWN" if nic["ifname"] == "lo" else nic["state"],
            "link_type": "loopback" if nic["ifname"] == "lo" else "ether",
            "address": nic["mac"]}
    if with_addr:
        info["addr_info"] = [{"family": "inet", "local": nic["ipv4"], "prefixlen": nic["prefix"],
                              "scope": "host" if nic["ifname"] == "lo" else "global",
                              "label": nic["ifname"], "valid_life_time": 4294967295,
                              "preferred_life_time": 4294967295}] if nic["ipv4"] else []
    return info


def show_addr(nics, opts):
    if "json" in opts:
        print(json.dumps([addr_json(n) for n in nics]))
        return
    for nic in nics:
        if "brief" in opts:
            addr = f"{nic['ipv4']}/{nic['prefix']}" if nic["ipv4"] else ""
            print(f"{nic['ifname']:<16} {nic['state']:<14} {addr}")
        elif "oneline" in opts:
            if nic["ipv4"]:
                print(f"{nic['ifindex']}: {nic['ifname']}    {inet_line(nic)}\\"
                      "       valid_lft forever preferred_lft forever")
        else:
            print(header(nic))
            print(f"    link/ether {nic['mac']} brd ff:ff:ff:ff:ff:ff")
            if nic["ipv4"]:
                print(f"    {inet_line(nic)}\n       valid_lft forever preferred_lft forever")


def show_link(nics, opts):
    if "json" in opts:
        print(json.dumps([addr_json(n, with_addr=False) for n in nics]))
        return
    sep = "\\    " if "oneline" in opts else "\n    "
    for nic in nics:
        print(header(nic).replace(" group", " mode DEFAULT group") +
              f"{sep}link/ether {nic['mac']} brd ff:ff:ff:ff:ff:ff")


def route_get(nics, target):
    dest = ipaddress.ip_address(target)
    for nic in nics:
        if nic["ipv4"] and nic["ifname"] != "lo" and \
                dest in ipaddress.ip_interface(f"{nic['ipv4']}/{nic['prefix']}").network:
            print(f"{target} dev {nic['ifname']} src {nic['ipv4']} uid 0\n    cache")
            return 0
    mgmt = next(n for n in nics if n.get("mgmt"))
    print(f"{target} via {mgmt['ipv4']} dev {mgmt['ifname']} src {mgmt['ipv4']} uid 0\n    cache")
    return 0


def main(argv):
    opts = set()
    while argv and argv[0].startswith("-"):
        if argv[0] not in FLAGS:
            print(f'Option "{argv[0]}" is unknown, try "ip -help".', file=sys.stderr)
            return 255
        opts.add(FLAGS[argv.pop(0)])
    obj, rest = (argv[0], argv[1:]) if argv else ("help", [])
    nics = interfaces()
    if obj in ("r", "ro", "route") and rest[:1] == ["get"] and len(rest) > 1:
        return route_get(nics, rest[1])
    if "dev" in rest:
        name = rest[rest.index("dev") + 1]
        nics = [n for n in nics if n["ifname"] == name]
        if not nics:
            print(f'Device "{name}" does not exist.', file=sys.stderr)
            return 1
    if obj in ("a", "addr", "address"):
        show_addr(nics, opts)
    elif obj in ("l", "link"):
        show_link(nics, opts)
    else:
        print(f'Object "{obj}" is unknown, try "ip help".', file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
