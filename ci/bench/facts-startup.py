#!/usr/bin/env python3
"""Start-up time at N = 1 of two cmpirun builds, side by side: planning with a cold and a warm image
facts cache, and a whole `-n 1 hello` job.

    ci/bench/facts-startup.py OLD_CMPIRUN NEW_CMPIRUN [--runs 12]

Everything runs as the unprivileged test user (as ci/bench/bench.py does), from copies of the two
binaries and of the mpich4 image (from `$CMPIRUN_TEST_IMAGES` or `.cache/images`) in a temporary folder under /var/tmp that is removed at the end.
The two builds run in turn (A B A B ...) so that drift on a shared machine hits both alike; the
output gives the median and quartiles of each, and the load average at the start and the end.

Cases:
- dry-run cold: `cmpirun --dry-run -n 1 mpich4.sif /usr/local/bin/hello` with an empty cache folder
  (`XDG_CACHE_HOME`) every run: the image facts are read from the image;
- dry-run warm: the same with the cache of the previous run kept;
- run -n 1 (cold, warm): `cmpirun -n 1 mpich4.sif /usr/local/bin/hello`, with an empty cache
  folder every run, and with the cache kept; interleaved with the floor, native
  `mpiexec.hydra -n 1 hello` (examples/mpi/hello.c compiled with the host's `mpicc.mpich`, the same
  MPICH 4.0.2), to give the time cmpirun adds at N = 1.
"""

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (the harness's run-as-test-user and settle helpers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--runs", type=int, default=12)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("facts-startup: run as root (it runs everything as the test user)")
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    b = B.Bench(argparse.Namespace(quick=False))
    w = b.work
    try:
        for d in ["run", "images", "cold", "warm-old", "warm-new"]:
            (w / d).mkdir()
            shutil.chown(w / d, B.TEST_USER, B.TEST_USER)
        os.chmod(w / "run", 0o700)
        bins = {}
        for label, src in [("old", args.old), ("new", args.new)]:
            (w / label / "bin").mkdir(parents=True)
            shutil.copy2(src, w / label / "bin/cmpirun")
            os.chmod(w / label / "bin/cmpirun", 0o755)
            shutil.copytree(B.ROOT / "profiles", w / label / "share/cmpirun/profiles")
            bins[label] = w / label / "bin/cmpirun"
        image = w / "images/mpich4.sif"
        images = Path(os.environ.get("CMPIRUN_TEST_IMAGES") or B.ROOT / ".cache/images")
        shutil.copy2(images / "mpich4.sif", image)
        os.chmod(image, 0o644)
        hello = "/usr/local/bin/hello"
        # The floor: the same hello compiled on the host against the same MPICH, under hydra.
        native = w / "hello-native"
        subprocess.run(["mpicc.mpich", "-O2", "-o", native, B.ROOT / "examples/mpi/hello.c"], check=True)
        load0 = B.loadavg()
        B.say(f"load average at start: {' '.join(load0)}; {args.runs} runs of each, interleaved")

        def run(label, argv, cache):
            prog = ["mpiexec.hydra", "-n", "1", native] if label == "native" else [bins[label]] + argv
            secs, rc, out, err = b.run(prog, env={"XDG_CACHE_HOME": str(cache)})
            if rc != 0:
                sys.exit(f"{label} {argv} failed ({rc}): {err[-2000:]}")
            return secs * 1000

        cases = [
            ("dry-run cold", ["--dry-run", "-n", "1", image, hello], "cold"),
            ("dry-run warm", ["--dry-run", "-n", "1", image, hello], "warm"),
            ("run -n 1 hello (cold)", ["-n", "1", image, hello], "cold"),
            ("run -n 1 hello (warm)", ["-n", "1", image, hello], "warm"),
        ]
        for name, argv, cache in cases:
            labels = ["old", "new"] + (["native"] if argv[0] == "-n" else [])
            times = {k: [] for k in labels}
            for _ in range(args.runs):
                for label in labels:
                    if cache == "cold":
                        c = w / "cold"
                        shutil.rmtree(c)
                        c.mkdir()
                        shutil.chown(c, B.TEST_USER, B.TEST_USER)
                    elif label == "native":
                        c = w / "cold"
                    else:
                        c = w / f"warm-{label}"
                        # The first, unmeasured run fills the cache.
                        if not times[label] and not any(c.rglob("*.json")):
                            run(label, argv, c)
                    times[label].append(run(label, argv, c))
            o, n = (statistics.median(times[k]) for k in ["old", "new"])
            qo, qn = (B.quartiles(times[k]) for k in ["old", "new"])
            line = (
                f"{name:24s} old {o:7.1f} ms ({qo[0]:.0f}-{qo[1]:.0f})   new {n:7.1f} ms "
                f"({qn[0]:.0f}-{qn[1]:.0f})   new/old {n / o:.2f}"
            )
            if "native" in times:
                h = statistics.median(times["native"])
                line += f"   hydra native {h:.1f} ms: added old +{o - h:.0f} ms, new +{n - h:.0f} ms"
            B.say(line)
        B.say(f"load average at end: {' '.join(B.loadavg())}")
    finally:
        b.kill_all()
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
