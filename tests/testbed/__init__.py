"""Test bed for sparkrun: simulated DGX Spark hosts reached over real ssh.

    bed = TestBed(workdir, n_hosts=3).start()      # or `with TestBed(...) as bed:`
    env = {**os.environ, **bed.env()}              # run sparkrun with this env
    h1 = bed.hosts[0]                              # addr 127.0.0.11, id spark-1
    h1.ssh("docker ps").stdout
    bed.stop()

Hosts. Host N is an sshd on 127.0.0.(first_octet+N-1):22 and on its CX7
addresses 127.10.10.x / 127.10.11.x, with
its own host key, run inside a private mount + UTS namespace: hostname
spark-N, /root and /tmp bind-mounted from <root>/home and <root>/tmp.
sshd's SetEnv gives every session:
    PATH               <root>/bin (docker, ip, nvidia-smi stand-ins) + system PATH
    TESTBED_HOST_ADDR  127.0.0.1x
    TESTBED_HOST_ID    spark-N
    TESTBED_STATE      <root> (the host's state dir, same path on both sides)
    SPARKRUN_SYSFS     <root>/sysfs (fake class/infiniband and class/net)
    SPARKRUN_NETPLAN_DIR, SPARKRUN_DROP_CACHES
                       <root>/etc/netplan and <root>/drop_caches (setup cx7,
                       clear-cache and run's page-cache step write these, not
                       the machine's real files; host.block_drop_caches() makes
                       that write fail even for root)
    SPARKRUN_MEMINFO   <root>/meminfo, the host's /proc/meminfo: MemTotal of a
                       DGX Spark, MemAvailable from facts/memory.json
                       (host.set_memory) minus what GPU processes hold
                       (--query-compute-apps rewrites it: read it after
                       asking nvidia-smi, as sparkrun's probe does), and
                       Shmem: what the files in <root>/dev-shm hold
    TESTBED_RUN        token of this bed (every process carrying it is
                       killed by bed.stop())
With a private /root, sshd also accepts keys in the host's own
~/.ssh/authorized_keys (setup ssh builds the mesh there).

Containers. The docker stand-in keeps its state in <root>/docker and runs
container commands as real processes (own session/process group) with
the fake engines (engines/bin: vllm, sglang, llama-server, rpc-server,
ray; engines/py on PYTHONPATH) first on PATH. Containers share the
host's network: a server asked to bind 0.0.0.0, "", localhost or
127.0.0.1 binds the host's address instead, and fake IB addresses are
mapped to the owning host's address (<root>/addrmap.json). A container run
with --ipc host gets the host's /dev/shm, <root>/dev-shm (host.dev_shm), as
TESTBED_DEV_SHM: the fake vLLM and SGLang put a segment there at start and
unlink it on SIGTERM (`docker stop`), not on SIGKILL (`docker rm -f`).

Faults (host.fault(name, value)) are files in <root>/faults:
    docker_permission    every docker command fails like a user outside the docker group
    docker_run_fail      `docker run` fails with exit 125 (value: message)
    docker_slow          "SUBCOMMAND SECONDS": that docker command (run, ps, load, ...)
                         takes that long before it does anything
    no_docker            `docker` behaves as "command not found" (exit 127)
    engine_exit          engines print an error and exit 1 at start
    engine_slow_ready    engines wait <value> seconds before listening
    engine_crash_after   engines exit 1 <value> seconds after starting
    engine_crash         running engines exit 1 as soon as it is set
    engine_slow_stop     engines take <value> seconds to shut down on SIGTERM
    engine_shm_mib       size of the segment engines put in the host's /dev/shm (128)
    engine_stall         the hang: /metrics shows <value> waiting requests and generation stops
    engine_slow_generate completions generate a token every <value> seconds
    no_generate          /v1/models works, completions return HTTP 500
    no_default_route     an offline lab: engines find no default route to take their
                         own address from (vLLM and SGLang then advertise 0.0.0.0)
    disk_free            `df` shows <value> bytes available on every filesystem

RDMA facts. host.set_ib(facts.spark_ports({0: addr})) gives a host a DGX Spark's
two CX7 ports, each as twin RDMA devices, the first twin of each cabled port
addressed. Tests read a container's real environment with host.container_env(name);
a Ray worker node keeps the environment vLLM gave its worker process in
/tmp/ray/actor_env.json (host.tmp / "ray/actor_env.json").

Bytes. `ssh` on the hosts and on the control machine carries each connection
through a counting relay (hostbin/ssh, meter.py): bed.transfers() lists who
sent how many bytes to whom; bed.reset() starts counting again.

Platforms. Host dockers are arm64 (`docker version` Server.Arch); the control
machine's docker says TESTBED_ARCH (the CLI fixture: amd64). A registry tag
may hold one image per architecture (a multi-arch image): `docker pull` takes
the daemon's own, or --platform's. host.use_containerd_store() makes a host's
`.Id` the manifest digest instead of the config digest, as Docker's containerd
image store does.

Engines serve /metrics in their real names and types (fakeengine/metrics.py) and register
their GPU memory (gpu_memory_utilization, mem_fraction_static) in <root>/gpu_processes/<pid>
("MiB name"), which nvidia-smi lists per process. Memory is a DGX Spark's (GB10, unified): the
GPU's memory totals are [N/A], the engines take their share of the host's MemTotal, and what they
hold is gone from MemAvailable (host.set_gpu(unified_memory=False) for a discrete GPU). The fake
vLLM keeps a torch.compile cache under $VLLM_CACHE_ROOT and logs a hit when it starts again with
the same model; outside a mount that cache lands in the container's own layer and is lost.
"""
from .bed import TestBed
from .host import Host

__all__ = ["TestBed", "Host", "start_bed"]


def start_bed(tmp_path_factory, n=3, **kwargs):
    """Start a bed in a fresh pytest temp dir; the caller must call .stop()."""
    return TestBed(tmp_path_factory.mktemp("bed"), n_hosts=n, **kwargs).start()
