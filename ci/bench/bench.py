#!/usr/bin/env python3
"""cmpirun benchmarks against native MPI and against one container per rank (`ci/bench.sh`).

Every case runs its commands in turn (A B C, A B C, ...) in one invocation, so that drift on a
shared machine hits them alike, and prints medians and ratios to the case's baseline. Everything
that involves a container runs as the unprivileged test user with no capabilities; the baselines
run as that user too. A benchmark, not a test: it asserts nothing, it measures and reports.

Cases (select with --only):
  launch   hello (MPI_Init + MPI_Finalize) at N = 1, 4, 16, 64: native mpiexec.hydra, cmpirun
           with each image mount backend, the per-rank container model (ci/bench/per-rank.c),
           and the native hello under cmpirun's PMI server alone (no container)
  startup  where the added time at N = 1 goes: planning (--dry-run), `cmpirun exec /bin/true`,
           `cmpirun -n 1 /bin/true`, `cmpirun -n 1 hello`, next to hydra
  memory   peak RSS at N = 64 of the launcher, the node instance, the FUSE servers, the ranks
  comm     pingpong latency 8 B and bandwidth 1 MiB / 4 MiB, 2 ranks: MPICH 4 over shared memory
           (UCX) and MPICH 5 over libfabric tcp, inside cmpirun against native
  io       ci/bench-mount.sh: cold/warm reads of every file of the largest test image per backend
  pmi      256 PMI-1 clients (init, 4 puts, fence, 255 gets, finalize): cmpirun's PMI server
           (pmi/examples/mini_mpiexec) against mpiexec.hydra
  openmpi  hello at N = 1, 4, 16, 64 with Open MPI: cmpirun -n N openmpi4.sif (its PMIx server
           through the host's libpmix) and cmpirun --launcher mpirun, against Open MPI's own
           mpirun -n N hello (the same Debian Open MPI 4.1.4, compiled on the host)
  multinode  hello across the three-node test cluster (ci/start-cluster.sh; started and stopped
           here if it is not running): srun (-N K -n 2K, in one held allocation per K) and hydra
           over ssh (-f hosts), cmpirun with the mpich5 image against the MPICH 5 wheel's hello
           compiled on the host, over libfabric tcp, at K = 1, 2, 3 nodes; cmpirun also as the
           image's first launch (an empty node-local cache on every node) to show whether the
           per-node cost adds up across nodes

Run through ci/bench.sh, which builds what this needs and passes the paths in the environment.
"""

import argparse
import ctypes
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_USER = os.environ.get("TEST_USER", "tuser")
PER_RANK_ENV = {"UCX_POSIX_USE_PROC_LINK": "n", "UCX_TLS": "^cma"}
TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_NOLOCAL": "1"}
BACKENDS = ["fuse", "squashfuse", "extract"]
# The three-node test cluster (ci/start-cluster.sh) and MPICH 5 over libfabric tcp across it.
CLUSTER = Path(os.environ.get("CLUSTER_DIR") or "/run/cmpirun-test-cluster")
NODES = ["n1", "n2", "n3"]
FRONT_END_ADDR = "10.77.0.1"
OFI_ENV = {"FI_PROVIDER": "tcp", "MPIR_CVAR_CH4_NETMOD": "ofi"}


def say(*a):
    print(*a, flush=True)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs):
    if len(xs) < 4:
        return min(xs, default=float("nan")), max(xs, default=float("nan"))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.pw = pwd.getpwnam(TEST_USER)
        self.work = Path(tempfile.mkdtemp(prefix="cmpirun-bench-", dir="/var/tmp"))
        os.chmod(self.work, 0o755)
        self.md = []  # markdown lines for BENCHMARKS.md
        self.failures = []
        self.before = self.snapshot()
        self.keep = set()  # pids of long-lived helpers (a held Slurm allocation) and their trees

    # ---------------------------------------------------------------- running as the test user

    def user_env(self, extra=None):
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.pw.pw_dir,
            "USER": TEST_USER,
            "LOGNAME": TEST_USER,
            "LANG": "C.UTF-8",
            "XDG_CACHE_HOME": str(self.work / "cache"),
            "XDG_RUNTIME_DIR": str(self.work / "run"),
        }
        for k, v in (extra or {}).items():
            if v is None:  # removed: e.g. XDG_RUNTIME_DIR, for cmpirun's node-local default
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def as_user(self, cmd, env=None):
        prefix = [
            "setpriv",
            f"--reuid={TEST_USER}",
            f"--regid={TEST_USER}",
            "--init-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "env",
            "-i",
        ]
        return prefix + [f"{k}={v}" for k, v in self.user_env(env).items()] + list(map(str, cmd))

    def run(self, cmd, env=None, timeout=300, sampler=None):
        """Run cmd as the test user (its own session); returns (seconds, rc, stdout, stderr)."""
        full = self.as_user(cmd, env)
        t0 = time.perf_counter()
        p = subprocess.Popen(
            full,
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if sampler:
            sampler.start(p.pid)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = p.communicate()
            err += f"\n(timed out after {timeout} s)".encode()
        t1 = time.perf_counter()
        if sampler:
            sampler.stop()
        self.settle()
        return t1 - t0, p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def descendants(self):
        """Every live process below this one (orphans come back here: we are a subreaper), but
        the long-lived helpers in self.keep and their trees."""
        return list(descendant_table(skip=self.keep))

    def kill_all(self):
        for pid in self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap()

    @staticmethod
    def reap():
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def settle(self, limit=10.0):
        """Wait until every process of the run is gone (FUSE servers exit after the ranks)."""
        deadline = time.monotonic() + limit
        while True:
            self.reap()
            if not self.descendants():
                return
            if time.monotonic() > deadline:
                self.failures.append(f"processes {self.descendants()} still alive {limit} s after the run; killed")
                self.kill_all()
                return
            time.sleep(0.002)

    # ---------------------------------------------------------------- leftovers

    def snapshot(self):
        shm = set()
        for e in os.scandir("/dev/shm"):
            try:
                if e.stat(follow_symlinks=False).st_uid == self.pw.pw_uid:
                    shm.add(e.name)
            except OSError:
                pass
        mounts = set(open("/proc/self/mountinfo").read().splitlines())
        tmp = {e for e in os.listdir("/tmp") if e.startswith("cmpirun")}
        return shm, mounts, tmp

    def leftovers(self):
        shm0, mounts0, tmp0 = self.before
        shm1, mounts1, tmp1 = self.snapshot()
        procs = self.descendants()
        found = []
        if procs:
            found.append(f"processes {procs}")
        if shm1 - shm0:
            found.append(f"/dev/shm entries of {TEST_USER}: {sorted(shm1 - shm0)}")
        if mounts1 - mounts0:
            found.append(f"mounts: {sorted(mounts1 - mounts0)}")
        if tmp1 - tmp0:
            found.append(f"/tmp entries: {sorted(tmp1 - tmp0)}")
        return found

    # ---------------------------------------------------------------- staging

    def stage(self):
        w = self.work
        for d in ["cache", "run", "images"]:
            (w / d).mkdir()
            shutil.chown(w / d, TEST_USER, TEST_USER)
        os.chmod(w / "run", 0o700)
        shutil.copy2(os.environ["BENCH_CMPIRUN"], w / "cmpirun")
        os.chmod(w / "cmpirun", 0o755)
        images = ROOT / ".cache/images"
        self.images = {}
        for name in ["mpich4", "mpich5", "openmpi4"]:
            for ext in ["sif", "sqfs"]:
                src = images / f"{name}.{ext}"
                if src.is_file():
                    dst = w / "images" / src.name
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                    self.images[name] = dst
                    break
        for name in ["mpich4", "mpich5"]:
            if name not in self.images:
                sys.exit(f"bench: test image {name} not found in {images}: run ci/build-images.sh")
        info = subprocess.run(
            [w / "cmpirun", "image", "inspect", "--json", self.images["mpich4"]],
            capture_output=True,
            text=True,
            check=True,
        )
        self.offset = json.loads(info.stdout).get("root_filesystem", {}).get("offset", 0)

        # Native programs: Debian MPICH 4 (the same MPICH as the mpich4 image) and the MPICH 5
        # wheel the mpich5 image carries, copied where the test user can read it.
        ex = ROOT / "examples/mpi"
        for p in ["hello", "pingpong"]:
            subprocess.run(["mpicc.mpich", "-O2", "-o", w / f"{p}-mpich4", ex / f"{p}.c"], check=True)
        subprocess.run(["mpicc.openmpi", "-O2", "-o", w / "hello-openmpi4", ex / "hello.c"], check=True)
        whl = Path(os.environ["BENCH_MPICH5"])
        shutil.copytree(whl / "lib", w / "mpich5/lib", symlinks=True)
        subprocess.run(
            ["cc", "-O2", "-o", w / "pingpong-mpich5", ex / "pingpong.c", f"-I{whl}/include",
             f"-L{whl}/lib", f"-Wl,-rpath,{w}/mpich5/lib", "-Wl,--enable-new-dtags", "-lmpi"],
            check=True,
        )
        subprocess.run(
            ["cc", "-O2", "-o", w / "hello-mpich5", ex / "hello.c", f"-I{whl}/include",
             f"-L{whl}/lib", f"-Wl,-rpath,{w}/mpich5/lib", "-Wl,--enable-new-dtags", "-lmpi"],
            check=True,
        )
        subprocess.run(
            ["cc", "-O2", "-Wall", "-o", w / "per-rank", ROOT / "ci/bench/per-rank.c"], check=True
        )
        subprocess.run(
            ["cc", "-O2", "-o", w / "pmi1_wire", ROOT / "pmi/tests/clients/pmi1_wire.c"], check=True
        )
        shutil.copy2(os.environ["BENCH_MINI_MPIEXEC"], w / "mini_mpiexec")
        for f in w.iterdir():
            if f.is_file():
                os.chmod(f, 0o755 if os.access(f, os.X_OK) else 0o644)
        # The extract backend unpacks once per node into the cache: do it before any timing.
        t, rc, out, err = self.run(
            [w / "cmpirun", "exec", "--image-mount", "extract", self.images["mpich4"], "/bin/true"]
        )
        if rc != 0:
            self.failures.append(f"extract warm-up failed: {err.strip()[-300:]}")
        self.extract_seconds = t

    def launcher_available(self):
        t, rc, out, err = self.run([self.work / "cmpirun", "-n", "1", self.images["mpich4"],
                                    "/usr/local/bin/hello"], timeout=120)
        if rc == 0 and "hello: rank=0 size=1" in out:
            return True, ""
        return False, (err.strip().splitlines() or ["(no output)"])[-1]

    # ---------------------------------------------------------------- launch

    def launch_variants(self, n, with_pmi_only=False):
        w = self.work
        img = self.images["mpich4"]
        v = [("native", ["mpiexec.hydra", "-n", n, w / "hello-mpich4"], {})]
        for b in BACKENDS:
            v.append((f"cmpirun {b}",
                      [w / "cmpirun", "-n", n, "--image-mount", b, img, "/usr/local/bin/hello"], {}))
        v.append(("per-rank", ["mpiexec.hydra", "-n", n, w / "per-rank", img, self.offset,
                               "/usr/local/bin/hello"], PER_RANK_ENV))
        if with_pmi_only:
            v.append(("pmi server only", [w / "mini_mpiexec", "-n", n, w / "hello-mpich4"], {}))
            # hydra's proxy makes every rank a session leader (setsid), so with the kernel's
            # autogroup scheduling each rank is its own scheduling group; this shows that effect.
            v.append(("pmi server, setsid", [w / "mini_mpiexec", "-n", n, "setsid", "-w", w / "hello-mpich4"], {}))
        return v

    def case_launch(self):
        ns = [1, 4, 16] if self.quick else [1, 4, 16, 64]
        say("\n## Launch: hello (MPI_Init + MPI_Finalize), mpich4 image, wall time per job")
        say("native = mpiexec.hydra -n N hello (Debian MPICH 4.0.2, compiled on the host);")
        say("cmpirun B = cmpirun -n N --image-mount B mpich4.sif hello;")
        say("per-rank = mpiexec.hydra -n N per-rank (own userns + squashfuse_ll + pivot_root per")
        say(f"rank) with {' '.join(f'{k}={v}' for k, v in PER_RANK_ENV.items())} (per-rank user")
        say("namespaces break UCX's /proc/<pid>/fd and CMA paths; that model only);")
        say("pmi server only = the native hello started by cmpirun's PMI server with no container")
        say("(pmi/examples/mini_mpiexec): separates the container's cost from the PMI server's;")
        say("pmi server, setsid = the same with each rank in its own session, as hydra's proxy does.")
        self.md += [
            "### Launch: hello, wall time per job (median ms; ratio to native)",
            "",
            "| N | runs | native | cmpirun fuse | cmpirun squashfuse | cmpirun extract | per-rank | PMI server only | PMI server, setsid per rank | per-rank / cmpirun fuse |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        self.launch = {}
        for n in ns:
            runs = self.args.runs or (3 if self.quick else (20 if n == 1 else 10))
            variants = self.launch_variants(n, with_pmi_only=True)
            times = {name: [] for name, _, _ in variants}
            for name, cmd, env in variants:  # warm-up: page cache, extract cache
                self.run(cmd, env)
            for r in range(runs):
                for name, cmd, env in variants:
                    t, rc, out, err = self.run(cmd, env)
                    ok = rc == 0 and out.count("hello: rank=") == n
                    if ok:
                        times[name].append(t * 1000)
                    else:
                        self.failures.append(f"launch N={n} {name}: rc={rc} {err.strip()[-300:]}")
                log(f"launch N={n}: round {r + 1}/{runs}")
            self.launch[n] = times
            base = median(times["native"])
            say(f"\nN = {n}, {runs} rounds")
            say(f"  {'variant':<20}{'median ms':>10}{'q1–q3 ms':>18}{'vs native':>11}{'per-rank/x':>12}")
            pr = median(times["per-rank"])
            for name, _, _ in variants:
                m = median(times[name])
                q1, q3 = quartiles(times[name])
                say(f"  {name:<20}{m:>10.1f}{f'{q1:.0f}–{q3:.0f}':>18}{m / base:>10.2f}x{pr / m:>11.2f}x"
                    f"   (n={len(times[name])})")
            cells = []
            for name, _, _ in variants:
                m = median(times[name])
                cells.append(f"{m:.0f}" if name == "native" else f"{m:.0f} ({m / base:.2f}×)")
            self.md.append(f"| {n} | {runs} | " + " | ".join(cells)
                           + f" | {pr / median(times['cmpirun fuse']):.2f}× |")
        if 1 in self.launch:
            t = self.launch[1]
            say("\nadded time at N = 1 (median cmpirun − median native):")
            for b in BACKENDS:
                say(f"  cmpirun {b:<11} {median(t[f'cmpirun {b}']) - median(t['native']):+.1f} ms")
            say(f"  per-rank           {median(t['per-rank']) - median(t['native']):+.1f} ms")
        self.md.append("")

    # ---------------------------------------------------------------- Open MPI

    def case_openmpi(self):
        """Open MPI jobs: cmpirun's PMIx server and --launcher mpirun against Open MPI's mpirun."""
        if "openmpi4" not in self.images:
            self.failures.append("openmpi: no openmpi4 image (run ci/build-images.sh)")
            return
        w = self.work
        img = self.images["openmpi4"]
        ns = [1, 4, 16] if self.quick else [1, 4, 16, 64]
        say("\n## Open MPI: hello (MPI_Init + MPI_Finalize), openmpi4 image, wall time per job")
        say("native = mpirun.openmpi -n N --oversubscribe hello (Debian Open MPI 4.1.4, on the host);")
        say("cmpirun = cmpirun -n N openmpi4.sif hello (cmpirun's PMIx server, host libpmix 4.2.2);")
        say("cmpirun mpirun = cmpirun --launcher mpirun -n N openmpi4.sif hello.")
        variants = [
            ("native", ["mpirun.openmpi", "-n", None, "--oversubscribe", w / "hello-openmpi4"]),
            ("cmpirun", [w / "cmpirun", "-n", None, img, "/usr/local/bin/hello"]),
            ("cmpirun mpirun", [w / "cmpirun", "--launcher", "mpirun", "-n", None, img,
                                "/usr/local/bin/hello"]),
        ]
        self.md += [
            "### Open MPI: hello, wall time per job (median ms; ratio to Open MPI's mpirun)",
            "",
            "| N | runs | mpirun (native) | cmpirun (PMIx server) | cmpirun --launcher mpirun |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n in ns:
            runs = self.args.runs or (3 if self.quick else (20 if n == 1 else 10))
            cmds = [(name, [str(n) if a is None else a for a in cmd]) for name, cmd in variants]
            times = {name: [] for name, _ in cmds}
            for name, cmd in cmds:  # warm-up
                self.run(cmd)
            for r in range(runs):
                for name, cmd in cmds:
                    t, rc, out, err = self.run(cmd)
                    if rc == 0 and out.count("hello: rank=") == n:
                        times[name].append(t * 1000)
                    else:
                        self.failures.append(f"openmpi N={n} {name}: rc={rc} {err.strip()[-300:]}")
                log(f"openmpi N={n}: round {r + 1}/{runs}")
            base = median(times["native"])
            say(f"\nN = {n}, {runs} rounds")
            cells = []
            for name, _ in cmds:
                m = median(times[name])
                q1, q3 = quartiles(times[name])
                say(f"  {name:<16}{m:>10.1f} ms{f'{q1:.0f}–{q3:.0f}':>14}{m / base:>9.2f}x  (n={len(times[name])})")
                cells.append(f"{m:.0f}" if name == "native" else f"{m:.0f} ({m / base:.2f}×, {m - base:+.0f} ms)")
            self.md.append(f"| {n} | {runs} | " + " | ".join(cells) + " |")
        self.md.append("")

    # ---------------------------------------------------------------- across nodes

    def cluster_nodes(self):
        """The idle (or busy) nodes of the three-node test cluster, 0 when it is not running."""
        conf = CLUSTER / "slurm.conf"
        if not conf.is_file():
            return 0
        p = subprocess.run(["sinfo", "-h", "-t", "idle,mix,alloc", "-o", "%D"], capture_output=True,
                           text=True, env=dict(os.environ, SLURM_CONF=str(conf)))
        return sum(int(x) for x in p.stdout.split() if x.isdigit())

    def node_root(self, node):
        return Path(f"/proc/{(CLUSTER / f'{node}.anchor').read_text().strip()}/root")

    def node_state(self):
        """Each node's /dev/shm entries, cmpirun* entries of /tmp (and in its runtime folders)."""
        out = set()
        for node in NODES:
            root = self.node_root(node)
            out |= {f"{node}:/dev/shm/{e}" for e in os.listdir(root / "dev/shm")}
            for e in os.listdir(root / "tmp"):
                if e.startswith("cmpirun-") and (root / "tmp" / e).is_dir():
                    out |= {f"{node}:/tmp/{e}/{i}" for i in os.listdir(root / "tmp" / e)}
                elif e.startswith("cmp"):
                    out.add(f"{node}:/tmp/{e}")
        return out

    def hold_allocation(self, nodes, tasks):
        """salloc -N nodes -n tasks, held (a shell that writes salloc's environment, then sleeps)
        until release_allocation: the jobs of a case run as steps of one allocation, so that the
        timings are those of the launch, not of the scheduler. Returns (process, SLURM_* env)."""
        d = self.work / "mn"
        d.mkdir(exist_ok=True)
        shutil.chown(d, TEST_USER, TEST_USER)
        envfile = d / f"alloc-{nodes}.env"
        p = subprocess.Popen(
            self.as_user(["salloc", "-N", nodes, "-n", tasks, "/bin/sh", "-c",
                          f'env > {envfile}.part && mv {envfile}.part {envfile} && exec sleep 100000'],
                         {"SLURM_CONF": str(CLUSTER / "slurm.conf")}),
            cwd=self.work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.keep.add(p.pid)
        deadline = time.monotonic() + 30
        while not envfile.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                self.release_allocation(p)
                raise RuntimeError(f"salloc -N {nodes} -n {tasks} gave no allocation")
            time.sleep(0.05)
        env = {}
        for line in envfile.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.startswith("SLURM_"):
                env[k] = v
        return p, env

    def release_allocation(self, p):
        """Ends a held allocation: salloc ignores SIGTERM, so its command (the sleep) is ended,
        and salloc gives the allocation back and exits."""
        end_tree(p.pid, signal.SIGTERM, below_only=True)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            end_tree(p.pid, signal.SIGKILL)
            p.wait()
        self.keep.discard(p.pid)
        self.settle()

    def case_multinode(self):
        """hello across the three-node cluster: srun and hydra over ssh, cmpirun against native."""
        if self.cluster_nodes() != len(NODES):
            self.failures.append("multinode: the three-node test cluster is not running "
                                 "(ci/bench.sh starts it; or run ci/start-cluster.sh)")
            return
        # The tests that launch containers (and use this cluster) take this lock one at a time:
        # holding it keeps their jobs off the cluster and the CPUs while this case measures.
        lock = open("/var/tmp/cmpirun-test.lock", "a")
        log("multinode: waiting for /var/tmp/cmpirun-test.lock (other runs' container tests)")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            self.multinode_locked()
        finally:
            lock.close()

    def multinode_locked(self):
        w = self.work
        img = self.images["mpich5"]
        ks = [1, 2, 3]
        runs = self.args.runs or (3 if self.quick else 10)
        for k in ks:
            (w / f"hosts-{k}").write_text("".join(f"{n}:2\n" for n in NODES[:k]))
        say("\n## Across nodes: hello (MPI_Init + MPI_Finalize), MPICH 5 over libfabric tcp, 2 ranks per node")
        say("native = the MPICH 5 wheel's hello compiled on the host; cmpirun = the mpich5 image's hello;")
        say(f"both with {' '.join(f'{k}={v}' for k, v in OFI_ENV.items())}. srun: steps of one held")
        say("allocation of K nodes (`srun --mpi=pmi2 -N K -n 2K hello` against `cmpirun -n 2K --pmi")
        say("pmi2 mpich5.sif hello`); hydra: `mpiexec.hydra -localhost FE -f hosts -n 2K hello` against")
        say("`cmpirun -f hosts -n 2K mpich5.sif hello` (CMPIRUN_REPORT_ADDR=FE), proxies over ssh.")
        say("first = the image's first launch on every node: an empty node-local cache (XDG_CACHE_HOME")
        say("in each node's own /tmp: facts, library cache filled on each node at once); first, shared")
        say("= an empty cache in the folder every node sees (filled once, under its lock).")
        ofi_x = [a for k, v in OFI_ENV.items() for a in ("-x", f"{k}={v}")]
        fresh = iter(range(1_000_000))
        before = self.node_state()
        self.md += [
            "### Across nodes: hello, 2 ranks per node, wall time per job (median ms; ratio to native)",
            "",
            "| launcher | nodes | ranks | pairs | native | cmpirun | median of pair ratios | cmpirun, first (node-local cache) | cmpirun, first (shared cache) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        self.multinode = {}
        for launcher in ["srun", "hydra"]:
            for k in ks:
                n = str(2 * k)
                alloc = None
                if launcher == "srun":
                    alloc, slurm = self.hold_allocation(str(k), n)
                    base_env = dict(OFI_ENV, **slurm)
                    base_env["SLURM_CONF"] = str(CLUSTER / "slurm.conf")
                    native = ["srun", "--mpi=pmi2", "-N", str(k), "-n", n, w / "hello-mpich5"]
                    inside = [w / "cmpirun", "-n", n, "--pmi", "pmi2", *ofi_x, img, "/usr/local/bin/hello"]
                else:
                    base_env = dict(OFI_ENV, HYDRA_LAUNCHER_EXEC=str(CLUSTER / "bin/ssh"),
                                    CMPIRUN_REPORT_ADDR=FRONT_END_ADDR)
                    hosts = w / f"hosts-{k}"
                    native = ["mpiexec.hydra", "-localhost", FRONT_END_ADDR, "-f", hosts, "-n", n,
                              w / "hello-mpich5"]
                    inside = [w / "cmpirun", "-f", hosts, "-n", n, *ofi_x, img, "/usr/local/bin/hello"]
                # The runtime folder stays cmpirun's node-local default (/tmp/cmpirun-UID).
                base_env["XDG_RUNTIME_DIR"] = None
                variants = [("native", native, "warm"), ("cmpirun", inside, "warm"),
                            ("cmpirun first", inside, "local"), ("cmpirun first shared", inside, "shared")]
                times = {name: [] for name, _, _ in variants}
                pairs = []
                try:
                    for name, cmd, _ in variants[:2]:  # warm-up: page cache, facts, library cache
                        self.run(cmd, base_env, timeout=120)
                    for r in range(runs):
                        row = {}
                        for name, cmd, cache in variants:
                            env = dict(base_env)
                            first = None
                            if cache == "local":
                                first = f"cmpbench-first-{next(fresh)}"
                                env["XDG_CACHE_HOME"] = f"/tmp/{first}"
                            elif cache == "shared":
                                env["XDG_CACHE_HOME"] = str(w / "cache" / f"first-{next(fresh)}")
                            t, rc, out, err = self.run(cmd, env, timeout=120)
                            if first:
                                for root in [Path("/")] + [self.node_root(x) for x in NODES]:
                                    shutil.rmtree(root / "tmp" / first, ignore_errors=True)
                            if rc == 0 and out.count("hello: rank=") == 2 * k:
                                times[name].append(t * 1000)
                                row[name] = t * 1000
                            else:
                                self.failures.append(f"multinode {launcher} K={k} {name}: rc={rc} {err.strip()[-300:]}")
                        if "native" in row and "cmpirun" in row:
                            pairs.append(row["cmpirun"] / row["native"])
                        log(f"multinode {launcher} K={k}: round {r + 1}/{runs}")
                finally:
                    if alloc:
                        self.release_allocation(alloc)
                base = median(times["native"])
                self.multinode[(launcher, k)] = times
                say(f"\n{launcher}, {k} node(s), {n} ranks, {runs} rounds")
                for name, _, _ in variants:
                    m = median(times[name])
                    q1, q3 = quartiles(times[name])
                    say(f"  {name:<22}{m:>9.1f} ms{f'{q1:.0f}–{q3:.0f}':>12}{m / base:>8.2f}x{m - base:>+9.1f} ms"
                        f"   (n={len(times[name])})")
                if pairs:
                    say(f"  median of {len(pairs)} pair ratios cmpirun/native: {median(pairs):.3f}"
                        f" ({min(pairs):.2f}–{max(pairs):.2f})")
                cell = lambda name: f"{median(times[name]):.0f} ({median(times[name]) / base:.2f}×, {median(times[name]) - base:+.0f} ms)"
                self.md.append(f"| {launcher} | {k} | {n} | {len(pairs)} | {base:.0f} | {cell('cmpirun')} | "
                               f"{median(pairs) if pairs else float('nan'):.3f} | {cell('cmpirun first')} | "
                               f"{cell('cmpirun first shared')} |")
        self.md.append("")
        say("\nadded time (median cmpirun − median native) by number of nodes: per-node work done one")
        say("node after another would add about the 1-node figure for every further node")
        for launcher in ["srun", "hydra"]:
            for name in ["cmpirun", "cmpirun first", "cmpirun first shared"]:
                added = [median(self.multinode[(launcher, k)][name]) - median(self.multinode[(launcher, k)]["native"])
                         for k in ks]
                say(f"  {launcher:<6}{name:<22}" + "".join(f"{k} node(s) {a:+7.1f} ms   " for k, a in zip(ks, added)))
        left = self.node_state() - before
        if left:
            self.failures.append(f"multinode: left on the nodes: {sorted(left)}")

    # ---------------------------------------------------------------- start-up breakdown

    def case_startup(self):
        """Where cmpirun's added time at N = 1 goes: each step alone, interleaved."""
        runs = self.args.runs or (3 if self.quick else 20)
        w = self.work
        img = self.images["mpich4"]
        variants = [
            ("hydra /bin/true", ["mpiexec.hydra", "-n", "1", "/bin/true"]),
            ("hydra hello", ["mpiexec.hydra", "-n", "1", w / "hello-mpich4"]),
            ("cmpirun --dry-run", [w / "cmpirun", "--dry-run", "-n", "1", img, "/usr/local/bin/hello"]),
            ("cmpirun --dry-run, first", [w / "cmpirun", "--dry-run", "-n", "1", img, "/usr/local/bin/hello"]),
            ("cmpirun exec /bin/true", [w / "cmpirun", "exec", img, "/bin/true"]),
            ("cmpirun -n 1 /bin/true", [w / "cmpirun", "-n", "1", img, "/bin/true"]),
            ("cmpirun -n 1 hello", [w / "cmpirun", "-n", "1", img, "/usr/local/bin/hello"]),
            ("cmpirun -n 1 hello, first", [w / "cmpirun", "-n", "1", img, "/usr/local/bin/hello"]),
        ]
        # ", first": the image's first launch by this user on this node, i.e. without the
        # image-facts cache and the library cache (a fresh, empty XDG_CACHE_HOME for every run:
        # the facts are read from the image and its MPI stack is unpacked); the others find both
        # filled.
        fresh = iter(range(1_000_000))

        def env_of(name):
            if not name.endswith(", first"):
                return None
            d = w / "cache" / f"first-{next(fresh)}"
            return {"XDG_CACHE_HOME": str(d)}

        say(f"\n## Start-up breakdown at N = 1 (fuse backend), {runs} rounds")
        times = {name: [] for name, _ in variants}
        for name, cmd in variants:
            self.run(cmd, env_of(name))
        for r in range(runs):
            for name, cmd in variants:
                t, rc, out, err = self.run(cmd, env_of(name))
                if rc == 0:
                    times[name].append(t * 1000)
                else:
                    self.failures.append(f"startup {name}: rc={rc} {err.strip()[-300:]}")
            log(f"startup: round {r + 1}/{runs}")
        self.md += ["### Start-up breakdown at N = 1 (median ms)", "", "| command | median ms | q1–q3 |",
                    "|---|---:|---:|"]
        for name, _ in variants:
            m = median(times[name])
            q1, q3 = quartiles(times[name])
            say(f"  {name:<26}{m:>8.1f} ms   ({q1:.0f}–{q3:.0f})")
            self.md.append(f"| `{name}` | {m:.1f} | {q1:.0f}–{q3:.0f} |")
        self.md.append("")

    # ---------------------------------------------------------------- memory

    def case_memory(self):
        n = 16 if self.quick else 64
        runs = 1 if self.quick else 3
        say(f"\n## Memory at N = {n}: peak RSS (VmHWM, sampled every 5 ms), median of {runs} runs")
        variants = [v for v in self.launch_variants(n)]
        rows = {}
        for r in range(runs):
            for name, cmd, env in variants:
                s = Sampler()
                t, rc, out, err = self.run(cmd, env, sampler=s)
                if rc != 0:
                    self.failures.append(f"memory N={n} {name}: rc={rc} {err.strip()[-300:]}")
                    continue
                rows.setdefault(name, []).append(s.classify(name))
                if os.environ.get("BENCH_DEBUG"):  # the processes sampled, to check the roles
                    log(name, sorted(s.seen.items()))
        keys = ["launcher", "facts", "instance", "fuse", "ranks"]
        say(f"  {'variant':<20}{'launcher':>10}{'facts child':>13}{'instance':>10}{'FUSE (servers)':>16}{'ranks':>8}  (MiB)")
        med = {}
        for name, _, _ in variants:
            if name not in rows:
                continue
            med[name] = {k: median([row[k] for row in rows[name]]) / 1024 for k in keys}
            nf = max(row["fuse_count"] for row in rows[name])
            m = med[name]
            fuse = f"{m['fuse']:.1f} ({nf})"
            say(f"  {name:<20}{m['launcher']:>10.1f}{m['facts']:>13.1f}{m['instance']:>10.1f}{fuse:>16}{m['ranks']:>8.1f}")
        self.md += [
            f"### Memory at N = {n}: peak RSS in MiB (median of {runs} runs)",
            "",
            "| variant | launcher (cmpirun, or mpiexec.hydra + proxy) | cmpirun's image-facts child (transient) | node instance | FUSE servers (summed) | ranks (summed) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in med.items():
            self.md.append(f"| {name} | {m['launcher']:.1f} | {m['facts']:.1f} | {m['instance']:.1f} | {m['fuse']:.1f} | {m['ranks']:.1f} |")
        self.md.append("")
        if "per-rank" in med:
            pr = med["per-rank"]["fuse"]
            say("  per-rank FUSE memory / cmpirun's:")
            for b in ["fuse", "squashfuse"]:
                k = f"cmpirun {b}"
                if k in med and med[k]["fuse"] > 0:
                    both = med[k]["fuse"] + med[k]["instance"]
                    say(f"    {k:<20} {pr / med[k]['fuse']:.1f}x (FUSE server only), "
                        f"{pr / both:.1f}x (FUSE server + node instance)")
                    self.md.append(f"- per-rank FUSE memory / {k}: {pr / med[k]['fuse']:.1f}× "
                                   f"(server only), {pr / both:.1f}× (server + node instance)")
            self.md.append("")

    # ---------------------------------------------------------------- communication

    def case_comm(self):
        pairs = self.args.runs or (3 if self.quick else 10)
        iters = "500" if self.quick else "2000"
        w = self.work
        stacks = [
            ("mpich4 shm (UCX)", {},
             ["mpiexec.hydra", "-n", "2", w / "pingpong-mpich4", iters],
             [w / "cmpirun", "-n", "2", self.images["mpich4"], "/usr/local/bin/pingpong", iters]),
            ("mpich5 ofi tcp", TCP_ENV,
             ["mpiexec.hydra", "-n", "2", w / "pingpong-mpich5", iters],
             [w / "cmpirun", "-n", "2", self.images["mpich5"], "/usr/local/bin/pingpong", iters]),
        ]
        say(f"\n## Communication: pingpong, 2 ranks, {pairs} interleaved pairs (native, cmpirun),"
            f" ITERS={iters}")
        say(f"mpich5 ofi tcp runs with {' '.join(f'{k}={v}' for k, v in TCP_ENV.items())}"
            " (NOLOCAL: the two ranks talk through libfabric tcp, not MPICH's shared memory)")
        self.md += [
            f"### Communication: pingpong, 2 ranks, {pairs} interleaved pairs",
            "",
            "| stack | metric | native median | cmpirun median | median of pair ratios (cmpirun/native) |",
            "|---|---|---:|---:|---:|",
        ]
        self.comm = {}
        for label, env, native, inside in stacks:
            res = {"native": [], "cmpirun": []}
            for i in range(pairs):
                for name, cmd in [("native", native), ("cmpirun", inside)]:
                    t, rc, out, err = self.run(cmd, env)
                    vals = dict(
                        (int(b), (float(l), float(bw)))
                        for b, l, bw in re.findall(
                            r"pingpong: bytes=(\d+) iters=\d+ latency_us=([\d.]+) bandwidth_MBps=([\d.]+)", out)
                    )
                    if rc != 0 or len(vals) != 3:
                        self.failures.append(f"comm {label} {name}: rc={rc} {err.strip()[-300:]}")
                        res[name].append(None)
                    else:
                        res[name].append(vals)
                log(f"comm {label}: pair {i + 1}/{pairs}")
            say(f"\n{label}")
            say(f"  {'metric':<18}{'native':>12}{'cmpirun':>12}{'ratio':>9}{'pair-ratio median (min–max)':>32}")
            metrics = [("latency 8 B µs", 8, 0), ("bw 1 MiB MB/s", 1 << 20, 1), ("bw 4 MiB MB/s", 4 << 20, 1)]
            self.comm[label] = {}
            for mname, size, idx in metrics:
                nat = [r[size][idx] for r in res["native"] if r]
                ins = [r[size][idx] for r in res["cmpirun"] if r]
                pr = [b[size][idx] / a[size][idx] for a, b in zip(res["native"], res["cmpirun"]) if a and b]
                if not pr:
                    say(f"  {mname:<18} no successful pair")
                    continue
                mn, mi, mpr = median(nat), median(ins), median(pr)
                self.comm[label][mname] = mpr
                say(f"  {mname:<18}{mn:>12.2f}{mi:>12.2f}{mi / mn:>8.3f}x{f'{mpr:.3f} ({min(pr):.2f}–{max(pr):.2f})':>32}")
                self.md.append(f"| {label} | {mname} | {mn:.2f} | {mi:.2f} | {mpr:.3f} ({min(pr):.2f}–{max(pr):.2f}) |")
        self.md.append("")

    # ---------------------------------------------------------------- PMI

    def case_pmi(self):
        n = "256"
        runs = self.args.runs or (2 if self.quick else 7)
        w = self.work
        variants = [
            ("mpiexec.hydra", ["mpiexec.hydra", "-n", n, w / "pmi1_wire"]),
            ("cmpirun server", [w / "mini_mpiexec", "-n", n, w / "pmi1_wire"]),
        ]
        say(f"\n## PMI: {n} PMI-1 clients (init, 4 puts, fence, {int(n) - 1} gets, finalize), {runs} rounds")
        say("cmpirun server = pmi/examples/mini_mpiexec (cmpirun's PMI server starting the clients)")
        times = {name: [] for name, _ in variants}
        for r in range(runs):
            for name, cmd in variants:
                t, rc, out, err = self.run(cmd, timeout=300)
                if rc == 0:
                    times[name].append(t * 1000)
                else:
                    self.failures.append(f"pmi {name}: rc={rc} {err.strip()[-300:]}")
            log(f"pmi: round {r + 1}/{runs}")
        base = median(times["mpiexec.hydra"])
        self.md += ["### PMI: 256 clients, wall time per job (median ms)", "",
                    "| server | median ms | ratio to hydra |", "|---|---:|---:|"]
        for name, _ in variants:
            m = median(times[name])
            say(f"  {name:<16}{m:>10.1f} ms {m / base:>8.2f}x  (n={len(times[name])})")
            self.md.append(f"| {name} | {m:.0f} | {m / base:.2f}× |")
        self.md.append("")
        self.pmi = times

    # ---------------------------------------------------------------- image I/O

    def case_io(self):
        runs = "1" if self.quick else "5"
        say(f"\n## Image I/O: ci/bench-mount.sh (RUNS={runs}); `extract` is the unpacked tree (bound read-only)")
        env = dict(os.environ, RUNS=runs, TEST_USER=TEST_USER)
        p = subprocess.run([ROOT / "ci/bench-mount.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
        say(p.stdout.rstrip())
        if p.returncode != 0:
            self.failures.append(f"bench-mount.sh: rc={p.returncode} {p.stderr.strip()[-300:]}")
        self.md += ["### Image I/O (ci/bench-mount.sh)", "", "```", p.stdout.rstrip(), "```", ""]

    # ---------------------------------------------------------------- all

    def close(self):
        for pid in list(self.keep):  # a held allocation left by an error
            end_tree(pid, signal.SIGTERM, below_only=True)
        self.keep.clear()
        self.settle(limit=20)
        found = self.leftovers()
        self.kill_all()
        shutil.rmtree(self.work, ignore_errors=True)
        return found


def proc_table():
    """pid -> (name, ppid, state) of every live process."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        procs[int(d)] = (stat[stat.find("(") + 1 : stat.rfind(")")], int(fields[1]), fields[0])
    return procs


def descendant_table(skip=()):
    """pid -> (name, ppid) of every live process below this one (not below the pids in skip)."""
    procs = proc_table()
    children = {}
    for pid, (_, ppid, state) in procs.items():
        if state != "Z":
            children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        out[pid] = procs[pid][:2]
        todo += children.get(pid, [])
    return out


def end_tree(root, sig, below_only=False):
    """Sends sig to every process below root (and to root unless below_only)."""
    children = {}
    for pid, (_, ppid, _) in proc_table().items():
        children.setdefault(ppid, []).append(pid)
    todo, pids = [root], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    for pid in pids[1:] if below_only else pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Sampler:
    """Peak RSS of every process a run starts (the descendants of this one), polled every 5 ms."""

    def __init__(self):
        self.seen = {}  # pid -> [name, ppid, max VmHWM kB]
        self.stop_flag = threading.Event()

    def start(self, root):
        self.root = root
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_flag.set()
        self.thread.join()

    def loop(self):
        while not self.stop_flag.is_set():
            for pid, (name, ppid) in descendant_table().items():
                try:
                    status = open(f"/proc/{pid}/status").read()
                except OSError:
                    continue
                hwm = re.search(r"^VmHWM:\s*(\d+)", status, re.M)
                if not hwm:
                    continue
                e = self.seen.setdefault(pid, [name, ppid, 0])
                if e[0] != name:  # exec'd: a new image, a new peak
                    e[0], e[2] = name, 0
                if ppid != os.getpid():  # keep the real parent, not the subreaper
                    e[1] = ppid
                e[2] = max(e[2], int(hwm.group(1)))
            time.sleep(0.005)

    def classify(self, variant):
        """kB per role: launcher, facts (cmpirun's short-lived image-facts child), instance, fuse
        (summed), ranks (summed), fuse_count."""
        out = {"launcher": 0, "facts": 0, "instance": 0, "fuse": 0, "ranks": 0, "fuse_count": 0}
        root = self.root
        instances = set()
        if variant.startswith("cmpirun"):
            out["launcher"] = self.seen.get(root, ["", 0, 0])[2]
            # cmpirun forks the image-facts reader first, then the node instance (which has
            # children: the FUSE server, the environment script's shell).
            forks = sorted(p for p, (name, ppid, _) in self.seen.items() if ppid == root and name == "cmpirun")
            parents = {ppid for _, ppid, _ in self.seen.values()}
            instances = set([p for p in forks if p in parents] or forks[-1:])
            for p in forks:
                out["instance" if p in instances else "facts"] += self.seen[p][2]
        for pid, (name, ppid, kb) in self.seen.items():
            if name in ("mpiexec.hydra", "hydra_pmi_proxy", "mini_mpiexec"):
                out["launcher"] += kb
            elif name in ("squashfuse_ll", "cmpirun-fuse") or (ppid in instances and name == "cmpirun"):
                out["fuse"] += kb
                out["fuse_count"] += 1
            elif name.startswith("hello"):
                out["ranks"] += kb
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few runs, N up to 16: to check the harness")
    ap.add_argument("--only", default="launch,startup,memory,comm,io,pmi,openmpi,multinode", help="comma-separated cases")
    ap.add_argument("--runs", type=int, default=0, help="rounds per case (default: per case)")
    ap.add_argument("--markdown", help="also write the result tables as markdown to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it runs everything as the test user and drops page caches)")
    # Orphans of a run (FUSE servers outliving their rank) are reparented here, so every process
    # a run leaves is found, waited for before the next run, and counted.
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    only = args.only.split(",")
    b = Bench(args)
    load0 = loadavg()
    say(f"# cmpirun benchmarks {time.strftime('%Y-%m-%d %H:%M:%S %Z')}{' (--quick)' if args.quick else ''}")
    say(f"machine: {os.cpu_count()} CPUs (nproc {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}),"
        f" kernel {os.uname().release}, {os.uname().machine}")
    say(f"load average at start: {' '.join(load0)}")
    if float(load0[0]) > 3:
        say("WARNING: load average above 3: other work is running, timings are noise")
    ok = True
    try:
        b.stage()
        say(f"cmpirun: {os.environ['BENCH_CMPIRUN']} ({subprocess.run([b.work / 'cmpirun', '--version'], capture_output=True, text=True).stdout.strip()})")
        say(f"images: {', '.join(f'{k}={v.name}' for k, v in b.images.items())}; "
            f"extract backend's one-time extraction of mpich4: {b.extract_seconds * 1000:.0f} ms")
        launch_ok, why = b.launcher_available()
        if not launch_ok:
            say(f"cmpirun has no working launcher in this build ({why}): launch, memory and comm skipped")
        for case in only:
            if case in ("launch", "startup", "memory", "comm", "openmpi", "multinode") and not launch_ok:
                continue
            getattr(b, f"case_{case}")()
    finally:
        found = b.close()
    load1 = loadavg()
    say(f"\nload average at end: {' '.join(load1)}")
    if b.failures:
        ok = False
        say(f"\n{len(b.failures)} failed run(s):")
        for f in b.failures[:20]:
            say(f"  {f}")
    say("leftovers: " + ("; ".join(found) if found else "none (processes, mounts, /dev/shm, /tmp)"))
    if args.markdown:
        Path(args.markdown).write_text(
            f"Load average at start {' '.join(load0)}, at end {' '.join(load1)}.\n\n" + "\n".join(b.md) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
