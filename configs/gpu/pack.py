"""Copy a seeded subset of the PCam training tiles into a folder of the checkout, for the GPU round.

    python configs/gpu/pack.py gpu-pack [--max-mib 30]

The device machine sees only the working tree (at most 64 MiB with the committed weights), not `../shared`. The
folder must be ignored by git (`/gpu-pack/` is in .gitignore) and named in the device call's `carry`:

    run(command="python3 configs/gpu/round.py $OUT/round --data gpu-pack --minutes 9", carry=["gpu-pack"])

Tiles are taken in a seeded random order until `--max-mib` is reached, with the classes of the committed review
kept in proportion by the random order itself.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "pcam" / "train")
    ap.add_argument("--max-mib", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = sorted(args.source.glob("*.jpg"))
    if not files:
        raise SystemExit(f"--source: no .jpg tiles in {args.source}")
    random.Random(args.seed).shuffle(files)
    args.out.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    for p in files:
        size = p.stat().st_size
        if total + size > args.max_mib * 2**20:
            break
        shutil.copyfile(p, args.out / p.name)
        total += size
        n += 1
    print(f"{n} tiles, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
