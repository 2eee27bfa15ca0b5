"""The packaged default, rebuilt by one command: train, export, evaluate, card, ship.

    .venv/bin/python benchmarks/paediatric_default.py --out /work/artifacts/ped          # all
    .venv/bin/python benchmarks/paediatric_default.py --out /work/artifacts/ped --ship   # + package
    .venv/bin/python benchmarks/paediatric_default.py --out OUT --train-only             # stage 1

Trains :mod:`training.default_recipe` (paediatric Normal / Bacteria / Virus with an
``Adult`` population unit, MobileNetV3-Small at 224 px from scratch, PACS augmentation)
into ``OUT/run`` - resumed after the last completed epoch when re-run - then exports it
(fp32 and int8; temperature, ``low_confidence`` threshold and scope guard fitted on the
calibration split - the threshold by :func:`xrwatch.evaluation.choose_low_confidence`, never
on a reported set), evaluates it on the held-out paediatric sets (``kermany/TEST``, ``real/``'s
Kermany classes; original-resolution and squashed images separately), measures the population
gate on adult and paediatric films, and writes ``OUT/card.md``. ``--ship`` copies the model and
its card to ``xrwatch/models/default.onnx`` and ``default.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("paediatric_default")

DATA = "../shared/data/xray"


def train_stage(args: argparse.Namespace) -> Path:
    from xrwatch_training.default_recipe import DefaultConfig, train_default

    run = Path(args.out) / "run"
    values = {
        "data": args.data,
        "arch": args.arch,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
    }
    if args.augment is not None:
        values["augment"] = json.loads(args.augment)
    if args.max_images:
        values.update(max_images=args.max_images, max_steps_per_epoch=args.max_steps)
    values = {k: v for k, v in values.items() if v is not None}
    stored = run / "config.json"
    if stored.is_file():  # the run's own config; --epochs (and --threads) may change it
        values = {**json.loads(stored.read_text(encoding="utf-8")), **values}
    cfg = DefaultConfig.from_dict({k: v for k, v in values.items() if v is not None})
    done = run / "done.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8"))["epochs"] == cfg.epochs:
        logger.info("%s: finished run reused", run)
        return run
    return train_default(cfg, run)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA, help="the shared X-ray folder (its README)")
    p.add_argument("--out", required=True, help="run, models, evaluations and card go here")
    p.add_argument("--arch", default=None, help="default mobilenet_v3_small")
    p.add_argument("--image-size", type=int, default=None, help="default 224")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (or the run's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--augment",
        default=None,
        metavar="JSON",
        help="PacsAugment overrides, e.g. '{\"zoom\": [0.75, 1.2]}' (a resumed run records it)",
    )
    p.add_argument("--max-images", type=int, default=None, help="tests: per split")
    p.add_argument("--max-steps", type=int, default=None, help="tests: steps per epoch")
    p.add_argument("--train-only", action="store_true", help="stop after training")
    p.add_argument(
        "--no-train",
        action="store_true",
        help="use the run's best.pt as it stands (an unfinished run: the card says so)",
    )
    p.add_argument("--ship", action="store_true", help="copy the model into the package")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run = Path(args.out) / "run" if args.no_train else train_stage(args)
    if args.no_train and not (run / "best.pt").is_file():
        raise SystemExit(f"{run}: --no-train, but no epoch has finished yet")
    if args.train_only:
        return 0
    from paediatric_stages import finish  # export, evaluate, card, ship

    return finish(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
