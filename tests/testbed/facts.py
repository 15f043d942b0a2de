"""Hardware facts of a simulated host: fake sysfs tree, net.json, gpu.json, memory.json.

The sysfs tree mirrors Linux: class/net/<dev> and class/infiniband/<hca>
are symlinks into devices/<pci>/..., whose `device` links lead back to the
PCI function directory (vendor 0x15b3 for the ConnectX-7 ports).
"""
import ipaddress
import json
import os
import shutil

MELLANOX, REALTEK = "0x15b3", "0x10ec"
DEFAULT_GPU = {"name": "NVIDIA GB10", "memory_mib": 122572, "count": 1,
               "driver": "580.95.05", "cuda": "13.0", "uuid": "5e1f0c2a-77d3-4b1e-9a60",
               "unified_memory": True}  # memory.total/used: [N/A], as on a DGX Spark
# MemTotal as on a DGX Spark; on unified memory it is also the GPU's total as the engines see it.
DEFAULT_MEMORY = {"total_kib": 127600748, "available_kib": 122000000}
MGMT_IF = "enP7s7"


def default_ib(host_addr):
    """Two active RoCE ports like a DGX Spark. Their addresses are in 127.0.0.0/8 (the last
    octet is the host's) so that everything a test connects to stays on this machine."""
    octet = host_addr.rsplit(".", 1)[1]
    return [{"hca": "rocep1s0f1", "netdev": "enp1s0f1np1", "ipv4": f"127.10.10.{octet}"},
            {"hca": "roceP2p1s0f1", "netdev": "enP2p1s0f1np1", "ipv4": f"127.10.11.{octet}"}]


# A DGX Spark's two CX7 ports; each shows as two RDMA devices ("twins", one per PCIe x4 half):
# (hca, netdev, PCI function).
SPARK_PORTS = ((("rocep1s0f0", "enp1s0f0np0", "0000:01:00.0"), ("roceP2p1s0f0", "enP2p1s0f0np0", "0002:01:00.0")),
               (("rocep1s0f1", "enp1s0f1np1", "0000:01:00.1"), ("roceP2p1s0f1", "enP2p1s0f1np1", "0002:01:00.1")))


def spark_ports(addresses):
    """Entries for Host.set_ib of a DGX Spark as cabled in a lab: `addresses` maps a port (0, 1)
    to the IPv4 address its first twin holds (the second twin is active without an address, as
    netplan usually leaves it); a port not listed has no cable (DOWN)."""
    entries = []
    for port, twins in enumerate(SPARK_PORTS):
        for twin, (hca, netdev, pci) in enumerate(twins):
            entries.append({"hca": hca, "netdev": netdev, "pci": pci,
                            "ipv4": addresses.get(port) if twin == 0 else None,
                            "state": "ACTIVE" if port in addresses else "DOWN"})
    return entries


def normalize_ib(entries):
    defaults = {"ipv4": None, "prefix": 24, "state": "ACTIVE", "gid_index": 3, "mtu": 9000, "pci": None}
    return [dict(defaults, **e) for e in entries]


def mac_address(number, index):
    return f"4c:bb:47:{number:02x}:{index:02x}:01"


def gid_ipv4(ipv4):
    packed = ipaddress.IPv4Address(ipv4).packed.hex()
    return f"0000:0000:0000:0000:0000:ffff:{packed[:4]}:{packed[4:]}"


def gid_link_local(mac):
    parts = [int(x, 16) for x in mac.split(":")]
    eui = [parts[0] ^ 2] + parts[1:3] + [0xff, 0xfe] + parts[3:]
    groups = [f"{eui[i]:02x}{eui[i + 1]:02x}" for i in range(0, 8, 2)]
    return "fe80:0000:0000:0000:" + ":".join(groups)


def link_local(mac):
    """The IPv6 link-local address a port with this MAC takes (EUI-64), as ping prints it."""
    return str(ipaddress.IPv6Address(gid_link_local(mac).replace("0000:0000:0000", "0:0:0")))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def link(path, target):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, path.parent), path)


def net_device(sysfs, devdir, name, mac, mtu, up):
    """devices/.../net/<name> plus its class/net symlink."""
    ndir = devdir / "net" / name
    write(ndir / "operstate", "unknown" if name == "lo" else "up" if up else "down")
    write(ndir / "address", mac)
    write(ndir / "mtu", str(mtu))
    write(ndir / "carrier", "1" if up else "0")
    write(ndir / "type", "772" if name == "lo" else "1")
    if name != "lo":
        link(ndir / "device", devdir)
    link(sysfs / "class" / "net" / name, ndir)


def pci_function(sysfs, pci, vendor):
    devdir = sysfs / "devices" / "pci0000:00" / pci
    write(devdir / "vendor", vendor)
    write(devdir / "device", "0x1021" if vendor == MELLANOX else "0x8127")
    return devdir


def gid_table(port, entry, mac):
    """GIDs: 0/1 link-local v1/v2, IPv4 v1 at gid_index-1 and v2 at gid_index."""
    table = {0: (gid_link_local(mac), "IB/RoCE v1"), 1: (gid_link_local(mac), "RoCE v2")}
    if entry["ipv4"]:
        if entry["gid_index"] >= 2:
            table[entry["gid_index"] - 1] = (gid_ipv4(entry["ipv4"]), "IB/RoCE v1")
        table[entry["gid_index"]] = (gid_ipv4(entry["ipv4"]), "RoCE v2")
    for index in range(max(table) + 3):
        gid, kind = table.get(index, ("0000:" * 7 + "0000", None))
        write(port / "gids" / str(index), gid)
        if kind:
            write(port / "gid_attrs" / "types" / str(index), kind)
            write(port / "gid_attrs" / "ndevs" / str(index), entry["netdev"])


def ib_device(sysfs, index, entry, mac):
    devdir = pci_function(sysfs, entry["pci"] or f"{(index - 1) * 2:04x}:01:00.1", MELLANOX)
    active = entry["state"] == "ACTIVE"
    net_device(sysfs, devdir, entry["netdev"], mac, entry["mtu"], active)
    hca = devdir / "infiniband" / entry["hca"]
    port = hca / "ports" / "1"
    write(port / "state", "4: ACTIVE" if active else "1: DOWN")
    write(port / "phys_state", "5: LinkUp" if active else "3: Disabled")
    write(port / "link_layer", "Ethernet")
    write(port / "rate", "200 Gb/sec (4X HDR)")
    gid_table(port, entry, mac)
    write(hca / "node_type", "1: CA")
    write(hca / "fw_ver", "28.45.1020")
    link(hca / "device", devdir)
    link(sysfs / "class" / "infiniband" / entry["hca"], hca)


def write_sysfs(sysfs, number, ib):
    """(Re)build the host's fake sysfs tree."""
    shutil.rmtree(sysfs, ignore_errors=True)
    (sysfs / "class" / "infiniband").mkdir(parents=True)
    net_device(sysfs, sysfs / "devices" / "virtual", "lo", "00:00:00:00:00:00", 65536, True)
    mgmt = pci_function(sysfs, "0007:07:00.0", REALTEK)
    net_device(sysfs, mgmt, MGMT_IF, mac_address(number, 0xee), 1500, True)
    for index, entry in enumerate(ib, start=1):
        ib_device(sysfs, index, entry, mac_address(number, index))


def net_facts(number, addr, ib):
    """Interfaces as the fake `ip` reports them."""
    nics = [{"ifname": "lo", "ipv4": "127.0.0.1", "prefix": 8, "mtu": 65536, "state": "UNKNOWN",
             "mac": "00:00:00:00:00:00"},
            {"ifname": MGMT_IF, "ipv4": addr, "prefix": 8, "mtu": 1500, "state": "UP",
             "mac": mac_address(number, 0xee), "mgmt": True}]
    nics += [{"ifname": e["netdev"], "ipv4": e["ipv4"], "prefix": e["prefix"], "mtu": e["mtu"],
              "state": "UP" if e["state"] == "ACTIVE" else "DOWN",
              "mac": mac_address(number, i)} for i, e in enumerate(ib, start=1)]
    for index, nic in enumerate(nics, start=1):
        nic["ifindex"] = index
    return nics


def write_facts(root, number, addr, ib, gpu, memory):
    """sysfs/, facts/{net,gpu,memory}.json for one host (and no stale memo or meminfo: nvidia-smi
    (hostbin/memo) writes <root>/meminfo from memory.json and the GPU processes when asked for
    them)."""
    shutil.rmtree(root / "facts" / "memo", ignore_errors=True)
    write_sysfs(root / "sysfs", number, ib)
    write(root / "facts" / "net.json", json.dumps(net_facts(number, addr, ib), indent=1))
    write(root / "facts" / "gpu.json", json.dumps(gpu, indent=1))
    write(root / "facts" / "memory.json", json.dumps(memory))
    (root / "meminfo").unlink(missing_ok=True)
