"""Runs train_net on a small deterministic COCO dataset, in this process or through detectron2's
``launch`` (tests start it as a subprocess to kill it, or to spawn several processes).

    python tests/train_driver.py OUT_DIR [--num-gpus N] [--resume] [--writer-period P] [OPTS...]

The dataset is written to OUT_DIR/../data (once) and registered as "driver_coco" in every
process. After training each process saves its model weights to OUT_DIR/params_rank{R}.pth.
"""

import argparse
import os

import torch
from helpers import ROOT, register_coco, write_coco

DATASET = "driver_coco"


def register(data_dir: str, num_images: int = 4) -> str:
    json_file = os.path.join(data_dir, "annotations.json")
    if not os.path.isfile(json_file):
        write_coco(data_dir, num_images=num_images)
    return register_coco(DATASET, json_file, data_dir)


def train_args(out_dir, opts=(), resume=False, num_gpus=1):
    from detectron2.engine import default_argument_parser

    argv = ["--config-file", os.path.join(ROOT, "configs", "tiny_test.yaml"), "--num-gpus"]
    argv += [str(num_gpus)] + (["--resume"] if resume else [])
    argv += ["DATASETS.TRAIN", f"('{DATASET}',)", "MODEL.ALIGN_DETR.NUM_CLASSES", "2"]
    argv += ["OUTPUT_DIR", out_dir, "SEED", "7"] + list(opts)
    return default_argument_parser().parse_args(argv)


def worker(args, data_dir, writer_period, threads):
    """One process: register the data, train, save this rank's weights."""
    torch.set_num_threads(threads)
    register(data_dir)
    from detectron2.utils import comm

    import train_net
    from align_detr.engine import Trainer
    from align_detr.engine.hooks import unwrap_model

    Trainer.writer_period = writer_period
    cfg = train_net.setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if comm.is_main_process() and not args.resume:
        init = unwrap_model(trainer.model).state_dict()
        torch.save(init, os.path.join(cfg.OUTPUT_DIR, "params_init.pth"))
    trainer.train()
    state = unwrap_model(trainer.model).state_dict()
    torch.save(state, os.path.join(cfg.OUTPUT_DIR, f"params_rank{comm.get_rank()}.pth"))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--writer-period", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    a = parser.parse_args(argv)
    from detectron2.engine import launch

    data_dir = os.path.join(os.path.dirname(os.path.abspath(a.out_dir)), "data")
    register(data_dir)  # write the files once, before any process starts
    args = train_args(a.out_dir, a.opts, a.resume, a.num_gpus)
    launch(
        worker,
        a.num_gpus,
        dist_url="auto",
        args=(args, data_dir, a.writer_period, a.threads),
    )


if __name__ == "__main__":
    main()
