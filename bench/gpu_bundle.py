"""Pack what one prepared GPU run needs into ``.gpu/`` (issue 17), so that a session lent a GPU
spends its few device minutes measuring, not installing.

The GPU image has torch, transformers and numba but not zarr. ``.gpu/`` gets:

* ``whl/``: cp312 wheels of what the image lacks (zarr and its pure-Python and compiled
  dependencies at the versions installed here) and the bench's anchors (Liger-Kernel, Cut
  Cross-Entropy, pure Python), fetched with ``pip download --no-deps``;
* ``demo/``: one student's inputs from a finished ``mtkd demo`` (``--demo``, else
  this checkout's demo, run once and cached by ``demo_input``: tokens, held-out tokens,
  targets, student config) and ``cpu.json``: the demo's own train arguments (paths made
  relative to the repo root) and the held-out CE and bits per byte the CPU run reached.

Then, in one device call with ``carry: [".gpu"]``: ``bash bench/gpu_check.sh``.

    .venv/bin/python bench/gpu_bundle.py [--demo /tmp/demo13]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from demo_input import add_demo_argument, finished_demo

#: What the GPU image lacks (installed here at the pinned versions) and the bench's anchors.
WHEELS = ("zarr", "numcodecs", "donfig", "google-crc32c", "typing-extensions")
ANCHORS = ("liger-kernel", "cut-cross-entropy")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MIB = 60  # the device tool carries at most 64 MiB with the working tree


def download(specs: list[str], dest: Path) -> None:
    """cp312 manylinux wheels of ``specs`` (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)


def student_inputs(demo: Path, student: str, dest: Path) -> dict[str, object]:
    """Copy ``student``'s train inputs from a demo run into ``dest``; its args and CPU figures."""
    results = json.loads((demo / "results.json").read_text())
    command = next((c for c in results["commands"]
                    if c.startswith("mtkd train ") and f"/students/{student} " in c + " "), None)
    if command is None:
        raise SystemExit(f"no `mtkd train` command for {student!r} in {demo}/results.json")
    args = shlex.split(command)[2:]
    rel = dest.relative_to(Path.cwd()) if dest.is_absolute() else dest
    out_args: list[str] = []
    skip = {"--out", "--threads", "--device"}
    i = 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        i += 2 if value is not None else 1
        if flag in skip:
            continue
        if value is not None and value.startswith(str(demo)):
            src = Path(value)
            target = dest / src.name
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
            value = str(rel / src.name)
        out_args += [flag] if value is None else [flag, value]
    final = results["students"][student]
    return {"student": student, "args": out_args, "heldout_ce": final["heldout_ce"],
            "heldout_bpb": final["heldout_bpb"], "demo": str(demo)}


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_demo_argument(ap)
    ap.add_argument("--student", default="single-t2-safety", help="the demo student to retrain")
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--no-anchors", action="store_true", help="skip Liger and CCE wheels")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "demo").mkdir(parents=True)
    download([f"{name}=={version(name)}" for name in WHEELS], args.out / "whl")
    if not args.no_anchors:
        download(list(ANCHORS), args.out / "whl")
    reference = student_inputs(finished_demo(args.demo), args.student, args.out / "demo")
    (args.out / "demo" / "cpu.json").write_text(json.dumps(reference, indent=1) + "\n")
    mib = size_mib(args.out)
    print(f"bundle={args.out} mib={mib:.1f} student={args.student} "
          f"cpu_heldout_ce={reference['heldout_ce']:.4f}")
    if mib > LIMIT_MIB:
        raise SystemExit(f"{args.out} holds {mib:.1f} MiB, over the {LIMIT_MIB} MiB the device "
                         "tool carries: pick a smaller student")


if __name__ == "__main__":
    main()
