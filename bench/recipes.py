"""Which training recipe holds at unseen hospitals: source-grouped cross-validation of named recipes on
every labelled real folder of ``../shared`` (folds grouped by collection across folders).

Each recipe trains its members once per fold; the table has a row per variant (each member alone and
all together, without and with flip TTA), every row temperature-scaled by cross-fitting on the other
folds: macro-F1 with its 95% bootstrap CI, the lowest class recall, ECE, and the review threshold that
keeps auto-routed accuracy at 99% with the coverage it leaves, images above the rules' default
``review.above_novelty`` going to review as in the router (``unfamiliar``: their share). A second
table says, for each collection as the unseen one, how many of its images the router would send on,
how many of those wrongly, and how many to review (of them, how many as unfamiliar), at the rules'
default review threshold. Runs are logged to MLflow (DATA_DIR's store).

    .venv/bin/python bench/recipes.py --recipe fine-tune [--recipe scratch ...] [--folds 3|loo] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from dicom_router.candidates import cross_validate, cv_table, load_labelled
from dicom_router.config import Settings
from dicom_router.routing.rules import FALLBACK_BELOW_CONFIDENCE, Review
from dicom_router.train import recipe_config

REPO = Path(__file__).resolve().parents[1]
COLLECTIONS = REPO / "training" / "shared-collections.csv"
RECIPES: dict[str, tuple[tuple[str, ...], str, dict[str, Any]]] = {
    # the former make train-real without its synthetic pretraining: a small CNN from scratch
    "scratch": (
        ("resnet18",),
        "scratch",
        {"image_size": 128, "epochs": 30, "patience": 15, "equalize": True},
    ),
    "fine-tune": (("tf_efficientnet_lite0", "mobilenetv2_100"), "fine-tune", {}),
    "fine-tune-mobilenetv2": (("mobilenetv2_100",), "fine-tune", {}),  # make train-real's until 2026-12-03
    "fine-tune-light-augment": (("tf_efficientnet_lite0",), "fine-tune", {"views": False}),
    "fine-tune-lite0": (("tf_efficientnet_lite0",), "fine-tune", {}),
    "fine-tune-synthetic": (
        ("tf_efficientnet_lite0",),
        "fine-tune",
        {"pretrain_synthetic": 1000, "pretrain_epochs": 3},
    ),
    "fine-tune-synthetic-variety": (
        ("tf_efficientnet_lite0",),
        "fine-tune",
        {"pretrain_synthetic": 1000, "pretrain_epochs": 3, "synthetic_variety": True},
    ),
    "fine-tune-mix-variety": (
        ("tf_efficientnet_lite0",),
        "fine-tune",
        {"mix_synthetic": 1000, "mix_share": 0.25, "synthetic_variety": True},
    ),
    "fine-tune-mobilenetv2-8-epochs": (("mobilenetv2_100",), "fine-tune", {"epochs": 8}),
    "fine-tune-mobilenetv2-20-epochs": (("mobilenetv2_100",), "fine-tune", {"epochs": 20, "patience": 8}),
    "fine-tune-mobilenetv2-averaged": (("mobilenetv2_100",), "fine-tune", {"average_epochs": 3.0}),
    "fine-tune-mobilenetv2-mix-variety": (
        ("mobilenetv2_100",),
        "fine-tune",
        {"mix_synthetic": 1000, "mix_share": 0.25, "synthetic_variety": True},
    ),
    "fine-tune-shallower": (
        ("tf_efficientnet_lite0", "mobilenetv2_100"),
        "fine-tune",
        {"frozen_stages": 2, "backbone_lr_scale": 0.1},
    ),
    "fine-tune-frozen4": (
        ("tf_efficientnet_lite0", "mobilenetv2_100"),
        "fine-tune",
        {"frozen_stages": 4, "backbone_lr_scale": 0.1},
    ),
    "fine-tune-lite1": (("tf_efficientnet_lite1",), "fine-tune", {}),
    "fine-tune-lite2": (("tf_efficientnet_lite2",), "fine-tune", {}),
    # one run, paired on the same folds: each member alone and the two in one graph
    "fine-tune-mobilenetv2-lite2": (("mobilenetv2_100", "tf_efficientnet_lite2"), "fine-tune", {}),
    "fine-tune-mobilenetv1": (("mobilenetv1_100",), "fine-tune", {}),
    # what make train-real promotes: the two in one graph (each member alone, paired on the same folds)
    "fine-tune-mobilenetv2-v1": (("mobilenetv2_100", "mobilenetv1_100"), "fine-tune", {}),
    "fine-tune-mobilenetv2-224": (("mobilenetv2_100",), "fine-tune", {"image_size": 224}),  # the former
    # what ImageNet adds: the recipe's size, views and equalisation from random weights, trained longer
    "scratch-mobilenetv2": (
        ("mobilenetv2_100",),
        "scratch",
        {"image_size": 288, "epochs": 20, "patience": 8, "views": True, "equalize": True},
    ),
}
"""name → (architectures, library recipe, overrides)."""
REVIEW = Review(below_confidence=FALLBACK_BELOW_CONFIDENCE)
"""One fixed threshold for every recipe, so the tables compare them alike: review below 0.97
confidence (the rules' threshold for a model that brings none of its own) and above 1.0 novelty. The
rules' default, each model's own threshold, is the table's "coverage at 99%"."""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), required=True)
    parser.add_argument("--folds", default="3", help="number of folds or loo")
    parser.add_argument("--group-by", default="collection")
    parser.add_argument(
        "--seed", type=int, default=0, help="deals the collections to folds (and seeds training)"
    )
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    settings = Settings()
    if settings.weights_dir is None:  # as make train-real: MobileNet weights from ../shared/weights
        settings = settings.model_copy(update={"weights_dir": settings.shared_dir / "weights"})
    folders = [settings.shared_dir / name for name in ("xray-real", "xray-more")]
    missing = [str(f) for f in folders if not (f / "labels.csv").is_file()]
    if missing:
        print(f"labelled folders missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    labelled = load_labelled(settings, data=[str(f) for f in folders], collections=COLLECTIONS)
    folds = None if args.folds == "loo" else int(args.folds)
    results: dict[str, Any] = {}
    per_group: dict[str, tuple[str, dict[str, Any]]] = {}
    print(
        "| recipe | variant | macro-F1 [95% CI] | min recall | ECE | unfamiliar | threshold "
        f"| coverage at 99% | at {REVIEW.below_confidence}: coverage, accuracy "
        "| the same without the novelty check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.recipe:
        archs, recipe, overrides = RECIPES[name]
        configs = [recipe_config(recipe, arch=arch, **overrides) for arch in archs]
        start = time.perf_counter()
        reports = cross_validate(
            settings,
            labelled,
            configs,
            group_by=args.group_by,
            folds=folds,
            seed=args.seed,
            review_threshold=REVIEW.fixed_threshold,
            above_novelty=REVIEW.above_novelty,
            progress=False,
        )
        table = cv_table(reports)
        results[name] = {
            "seconds": time.perf_counter() - start,
            "table": table,
            "per_group": {v: r["per_group"] for v, r in reports.items()},
        }
        for row in table:
            lo, hi = row["macro_f1_ci"]
            at, unchecked = row["at_review_threshold"], row["without_novelty_check"]
            print(
                f"| {name} | {row['variant']} | {row['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"{row['min_recall']:.3f} | {row['ece']:.3f} | {row['unfamiliar']:.3f} | "
                f"{row['review_threshold']:.3f} | {row['coverage']:.3f} | {at['coverage']:.3f}, "
                f"{at['auto_routed_accuracy']:.4f} ({int(at['misrouted'])} misrouted) | "
                f"{unchecked['coverage']:.3f}, {unchecked['auto_routed_accuracy']:.4f} |",
                flush=True,
            )
        whole = "+".join(config.name for config in configs)  # what make train-real would promote
        per_group[name] = (whole, reports[whole]["per_group"])
    for name, (variant, groups) in per_group.items():
        print(f"\n{name}, {variant}: each collection as the unseen one, at the rules' default review")
        print("| collection | n | accuracy | called | auto-routed | misrouted | to review (unfamiliar) |")
        print("|---|---|---|---|---|---|---|")
        for group, row in sorted(groups.items(), key=lambda item: item[1]["accuracy"]):
            routed, unfamiliar = row["at_threshold"], row["unfamiliar"]
            called = ", ".join(f"{label} {n}" for label, n in row["predicted"].items())
            print(
                f"| {group} | {row['n']} | {row['accuracy']:.2f} | {called} | {int(routed['auto_routed'])} "
                f"| {int(routed['misrouted'])} | {row['n'] - int(routed['auto_routed'])} ({unfamiliar}) |"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
