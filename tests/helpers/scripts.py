"""Loading the repository's scripts (tools/*.py) as modules."""

import importlib.util
import os
from typing import Dict, Sequence

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


def train_then_evaluate(config: str, dataset: str, out_dir: str, opts: Sequence[str] = ()) -> Dict:
    """Trains ``configs/<config>`` with ``train_net`` on the registered ``dataset`` (2 classes)
    into ``out_dir``, then runs ``--eval-only`` on its ``model_final.pth``; returns the
    evaluation results (``{"bbox": {"AP": ...}}``)."""
    base = ["--config-file", os.path.join(ROOT, "configs", config)]
    data = ["DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)"]
    common = data + ["MODEL.ALIGN_DETR.NUM_CLASSES", "2", "OUTPUT_DIR", out_dir, *opts]
    run_train_net(base + common)
    weights = ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
    return run_train_net(base + ["--eval-only"] + common + weights)
