"""Install detectron2's pure-Python code into the current environment (see docs/design.md).

detectron2 is not on PyPI. ``sal-detectron2==0.7.2`` is upstream detectron2 main of 2024-04-17
repackaged; its wheel is tagged cp310 (its bundled ``_C`` is never loaded by Python 3.11, so
detectron2 runs on its pure-Python paths and COCOEvaluator uses pycocotools). We download the
wheel for Python 3.10 with no dependencies, then copy only the ``detectron2`` package and its
dist-info into site-packages; the wheel's top-level ``tools/`` folder is left out on purpose.

An importable detectron2 (for example one built from source) is reused as is.
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

WHEEL = "sal-detectron2==0.7.2"


def main() -> int:
    if importlib.util.find_spec("detectron2") is not None:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already importable; reusing it")
        return 0
    site = sysconfig.get_paths()["purelib"]
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "target")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.10",
            "--target",
            target,
            WHEEL,
        ]
        subprocess.run(cmd, check=True)
        for name in ["detectron2", *map(os.path.basename, glob.glob(f"{target}/sal_detectron2*"))]:
            dst = os.path.join(site, name)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(target, name), dst)
    # The cp310 extension can never load here; drop it so nothing tries.
    for so in glob.glob(os.path.join(site, "detectron2", "_C*.so")):
        os.remove(so)
    import detectron2  # noqa: F401  (fails loudly if the copy is broken)

    print(f"installed {WHEEL} into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
