"""Loading the repository's scripts (tools/*.py) as modules."""

import importlib.util
import os

from .configs import ROOT


def load_script(relpath: str):
    """Imports a script of the repository, e.g. ``load_script("tools/prepare_trees.py")``."""
    path = os.path.join(ROOT, relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_net(argv):
    """``train_net.main`` on a command line (a list of strings), in this process."""
    from detectron2.engine import default_argument_parser

    import train_net

    return train_net.main(default_argument_parser().parse_args(argv))
