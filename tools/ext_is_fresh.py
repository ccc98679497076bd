"""Exit 0 when align_detr is installed (editable) and align_detr/_C*.so is newer than its sources.

Used by ``make setup`` so that re-running it does not invoke pip or the compiler.
"""

import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    spec = importlib.util.find_spec("align_detr")
    if spec is None or not spec.origin or not spec.origin.startswith(ROOT):
        return 1
    libs = glob.glob(os.path.join(ROOT, "align_detr", "_C*.so"))
    if not libs:
        return 1
    sources = [os.path.join(ROOT, "setup.py")]
    for ext in ("cpp", "cu", "h", "cuh"):
        sources += glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)
    newest_source = max(os.path.getmtime(p) for p in sources)
    return 0 if os.path.getmtime(libs[0]) >= newest_source else 1


if __name__ == "__main__":
    sys.exit(main())
