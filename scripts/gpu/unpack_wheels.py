#!/usr/bin/env python3
"""Unpacks wheels into a folder for PYTHONPATH, where pip cannot install them (pure-Python wheels only).

python scripts/gpu/unpack_wheels.py DEST WHEEL...
"""

from __future__ import annotations

import sys
import zipfile


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: {sys.argv[0]} DEST WHEEL...", file=sys.stderr)
        return 2
    dest, wheels = argv[0], argv[1:]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(dest)
        print(f"unpacked {wheel} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
