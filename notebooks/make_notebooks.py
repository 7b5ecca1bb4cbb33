#!/usr/bin/env python3
"""Write the analysis notebooks (``notebooks/*.ipynb``) from the cell sources below.

The notebooks are generated, not edited by hand, so that a review reads plain Python here and
the .ipynb files stay free of outputs. Regenerate after changing a cell:
``python notebooks/make_notebooks.py`` (writes next to this file; ``--out DIR`` elsewhere).
tests/test_notebooks.py executes every notebook top to bottom.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make the repository's `src` importable
    sys.path.insert(0, os.path.dirname(HERE))

from src import storage  # noqa: E402
from src.errors import run_cli  # noqa: E402

# Every notebook starts here: find the repository root (the folder holding src/) and import from it.
SETUP = """\
import os, sys
ROOT = os.path.abspath(".")
while not os.path.isfile(os.path.join(ROOT, "src", "plots.py")) and os.path.dirname(ROOT) != ROOT:
    ROOT = os.path.dirname(ROOT)
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "notebooks", "data")
%matplotlib inline
from src import plots"""

Cell = Tuple[str, str]  # ("md" | "code", source)

NOTEBOOKS: Dict[str, List[Cell]] = {
    "attack_effectiveness": [
        ("md", "# Attack effectiveness over training\n\n"
               "How much weaker than PGD-200 are few-step PGD attacks at each stage of adversarial training? "
               "The paper's own measurements (`notebooks/data/attack-effectiveness-*.csv`, written by "
               "`attack_effectiveness.py`: PGD-1/2/5/10/200 at eps 4/255 on the RobustBench ImageNet subset, "
               "checkpoints every 10 epochs, seeds 0-2). The quantity is the relative robust-loss gap "
               "`|L_200 - L_k| / L_200 * 100`; epochs count from 1 and the untrained checkpoint is left out.\n\n"
               "XCiT-S12$^*$ is XCiT-S12 trained with the canonical (heavy-augmentation) ViT recipe. "
               "The same figures as files: `python -m src.plots effectiveness CSV... --labels ... --out DIR`."),
        ("code", SETUP),
        ("code", 'FILES = {"XCiT-S12": "xcit", "XCiT-S12*": "xcit-original", "ResNet-50": "resnet",\n'
                 '         "ConvNeXt-T": "convnext"}\n'
                 'paths = [os.path.join(DATA, f"attack-effectiveness-{v}.csv") for v in FILES.values()]\n'
                 'figs = plots.effectiveness_figures(paths, labels=list(FILES))'),
        ("md", "The gap of PGD-1 per epoch, mean over seeds (the numbers behind `epoch_vs_pgd-1`):"),
        ("code", 'import pandas as pd\n'
                 'gaps = {label: plots.relative_gap(pd.read_csv(p), p)[0] for label, p in zip(FILES, paths)}\n'
                 'pd.DataFrame({label: g[g.steps == 1].groupby("epoch").gap.mean() for label, g in gaps.items()})'
                 '.round(2)'),
        ("code", 'assert set(figs) == {"epoch_vs_pgd-1", "steps", "steps_unaggregated", '
                 '"steps_vs_relative_difference"}'),
    ],
    "attack_convergence": [
        ("md", "# Attack convergence\n\n"
               "Per-example robust loss against the number of PGD steps, 20 random restarts each, on 32 correctly "
               "classified points, for the final (epoch-100) checkpoints of XCiT-S12 and GELU ResNet-50 "
               "(`notebooks/data/attack_convergence/*.csv`, written by `attack_convergence.py`). The point is drawn "
               "with `random.seed(42)` among the points of both files.\n\n"
               "As files: `python -m src.plots convergence XCIT.csv RESNET.csv --labels XCiT-S12 "
               "'GELU ResNet-50' --out DIR`."),
        ("code", SETUP),
        ("code", 'conv = os.path.join(DATA, "attack_convergence")\n'
                 'paths = [os.path.join(conv, "xcit-robust-99.csv"), os.path.join(conv, "resnet-robust-99.csv")]\n'
                 'figs = plots.convergence_figures(paths, labels=["XCiT-S12", "GELU ResNet-50"])'),
        ("md", "How much the restarts disagree after 500 steps (std of the loss over seeds, mean over points):"),
        ("code", 'import pandas as pd\n'
                 'pd.Series({name: pd.read_csv(p).query("steps == 500").groupby("point").loss.std().mean()\n'
                 '           for name, p in zip(["XCiT-S12", "GELU ResNet-50"], paths)}).round(4)'),
    ],
    "aa_sanity_check": [
        ("md", "# Robust accuracy against eps\n\n"
               "AutoAttack robust top-1 of the XCiT-S12 trained at eps 4/255, evaluated at eps 0, 2, ..., 16 "
               "(/255): it must fall to about 0 as eps grows, or the evaluation is broken (the numbers of the "
               "original's notebook, `notebooks/data/aa_sanity_check.csv`).\n\n"
               "For your own model: one validate.py results CSV with one row per eps (columns `eps` or "
               "`attack_eps`, and `robust_top1`), then `python -m src.plots robustness CSV --out DIR`."),
        ("code", SETUP),
        ("code", 'figs = plots.robustness_figures([os.path.join(DATA, "aa_sanity_check.csv")],\n'
                 '                                labels=["XCiT-S12 (trained at eps 4)"])'),
    ],
    "learning_curves": [
        ("md", "# Learning curves\n\n"
               "Robust top-1 per epoch of the paper's ImageNet runs (W&B exports in `notebooks/data/`): "
               "XCiT-S12, M12 and L12 on the validation subset and on the training batches, and GELU ResNet-50 "
               "against XCiT-S12. The band is the min-max over the runs of a model where there were several.\n\n"
               "Training runs of this project write `summary.csv`: `python -m src.plots learning-curves "
               "RUN/summary.csv ... --metric eval_robust_top1 --out DIR` (or `eval_top1`, `train_robust_top1`, ...)."),
        ("code", SETUP),
        ("code", 'NAMES = {"xcit_small_12_p16_224": "XCiT-S12", "xcit_medium_12_p16_224": "XCiT-M12",\n'
                 '         "xcit_large_12_p16_224": "XCiT-L12", "resnet50_gelu": "GELU ResNet-50"}\n'
                 'figs = plots.learning_curve_figures([os.path.join(DATA, "robust_acc_xcits.csv")], run_labels=NAMES)'),
        ("code", 'figs = plots.learning_curve_figures([os.path.join(DATA, "robust_acc_xcits_train.csv")],\n'
                 '                                    run_labels=NAMES, name="learning-curves-train")'),
        ("code", 'figs = plots.learning_curve_figures([os.path.join(DATA, "robust_acc.csv")], run_labels=NAMES,\n'
                 '                                    name="resnet-vs-xcit")'),
    ],
    "advex_example": [
        ("md", "# An adversarial example\n\n"
               "A photo (scikit-learn's bundled `china.jpg`), its L-inf PGD adversarial version (eps 4/255, 10 "
               "steps, `src.attacks`) and the perturbation, scaled as `(x_adv - x + eps) / (2 eps)`, with "
               "ImageNet class names from timm (`timm.data.ImageNetInfo`).\n\n"
               "**The model is timm's tiny `test_resnet`, randomly initialised and then trained for a few seconds "
               "to call the two bundled photos 'palace' and 'daisy'** (no weights can be downloaded here). It is "
               "not an ImageNet classifier; the point is the mechanics: an invisible perturbation moves the "
               "prediction. With a real checkpoint (`timm.create_model(name, pretrained=True)` where downloads "
               "work, or `src.checkpoint.load_model_weights`) the same cells show a real model fooled."),
        ("code", SETUP),
        ("code", 'import torch, timm\n'
                 'import torch.nn.functional as F\n'
                 'from sklearn.datasets import load_sample_images\n'
                 'from timm.data import ImageNetInfo, resolve_data_config\n'
                 'from PIL import Image\n'
                 'from src.attacks import make_attack\n'
                 'from src.data import build_eval_transform\n'
                 'from src.utils import normalize_model\n\n'
                 'torch.manual_seed(0)\n'
                 'info = ImageNetInfo()\n'
                 'net = timm.create_model("test_resnet", pretrained=False)\n'
                 'cfg = resolve_data_config({}, model=net)\n'
                 'model = normalize_model(net, cfg["mean"], cfg["std"])  # inputs are [0, 1] pixels\n'
                 'x = torch.stack([build_eval_transform(cfg)(Image.fromarray(a)) for a in load_sample_images().images])\n'
                 'y = torch.tensor([698, 985])  # ImageNet "palace" and "daisy"\n'
                 'opt = torch.optim.AdamW(model.parameters(), lr=3e-3)\n'
                 'model.train()\n'
                 'for step in range(15):  # a few seconds: both photos and their mirror images\n'
                 '    loss = F.cross_entropy(model(torch.cat([x, x.flip(-1)])), torch.cat([y, y]))\n'
                 '    opt.zero_grad(); loss.backward(); opt.step()\n'
                 'model.eval().requires_grad_(False)\n'
                 '[info.index_to_description(int(i)) for i in y]'),
        ("code", 'def top(img):\n'
                 '    with torch.no_grad():\n'
                 '        p = model(img).softmax(-1)[0]\n'
                 '    i = int(p.argmax())\n'
                 '    return f"{info.index_to_description(i)} ({100 * float(p[i]):.1f}%)", float(p[y[0]])\n\n'
                 'eps = 4 / 255\n'
                 'photo = x[:1]\n'
                 'attack = make_attack("pgd", eps, 1.5 * eps / 10, 10, "linf", (0.0, 1.0),\n'
                 '                     criterion=torch.nn.NLLLoss(reduction="sum"))\n'
                 'torch.manual_seed(0)\n'
                 'x_adv = attack(model, photo, y[:1])\n'
                 '(clean_text, clean_p), (adv_text, adv_p) = top(photo), top(x_adv)\n'
                 'print(f"clean:       {clean_text}")\n'
                 'print(f"adversarial: {adv_text}; P(palace) {100 * clean_p:.1f}% -> {100 * adv_p:.1f}%")\n'
                 'print(f"max |x_adv - x| = {255 * float((x_adv - photo).abs().max()):.2f} / 255")'),
        ("code", 'import matplotlib.pyplot as plt\n'
                 'with plt.rc_context(plots.STYLE):\n'
                 '    fig, axes = plt.subplots(1, 3, figsize=(plots.TEXT_WIDTH, 2.6))\n'
                 '    shown = [photo[0], (x_adv - photo + eps)[0] / (2 * eps), x_adv[0]]\n'
                 '    titles = [f"clean: {clean_text}", "perturbation (scaled)", f"adversarial: {adv_text}"]\n'
                 '    for ax, img, title in zip(axes, shown, titles):\n'
                 '        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())\n'
                 '        ax.set_title(title, fontsize=7)\n'
                 '        ax.axis("off")\n'
                 '    fig.tight_layout()'),
    ],
    "data_augmentations": [
        ("md", "# Data augmentations\n\n"
               "The light recipe's augmentations on scikit-learn's two bundled photos, through this project's "
               "transforms: RandAugment `rand-m9-mstd0.5-inc1` via `src.data.build_train_transform` (with the "
               "train parser's defaults: random-resized crop, flip), MixUp (alpha 0.9) and CutMix (alpha 1.0) "
               "with timm's `Mixup` as the trainer builds it, and random erasing on [0, 1] images "
               "(`src.data.NotNormalizedRandomErasing`, probability 1, per-pixel fill)."),
        ("code", SETUP),
        ("code", 'import random, torch\n'
                 'from PIL import Image\n'
                 'from sklearn.datasets import load_sample_images\n'
                 'from timm.data import Mixup\n'
                 'from src.arg_parser import parse_args\n'
                 'from src.data import build_eval_transform, build_train_transform, NotNormalizedRandomErasing\n'
                 'import matplotlib.pyplot as plt\n\n'
                 'random.seed(0); torch.manual_seed(0)\n'
                 'photos = [Image.fromarray(a) for a in load_sample_images().images]\n'
                 'cfg = {"input_size": (3, 160, 160), "crop_pct": 1.0, "interpolation": "bicubic",\n'
                 '       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}\n'
                 'args, _ = parse_args(["--dataset", "digits", "--aa", "rand-m9-mstd0.5-inc1", "--input-size", "3",\n'
                 '                      "160", "160", "--mixup", "0.9", "--cutmix", "1.0"])\n'
                 'clean = torch.stack([build_eval_transform(cfg)(p) for p in photos])\n'
                 'randaug = torch.stack([build_train_transform(args, cfg)(p) for p in photos for _ in range(2)])\n\n'
                 'def mix(cutmix):\n'
                 '    fn = Mixup(mixup_alpha=0.0 if cutmix else args.mixup, cutmix_alpha=args.cutmix if cutmix else 0.0,\n'
                 '               prob=1.0, mode="batch", num_classes=2)\n'
                 '    return fn(clean.clone(), torch.tensor([0, 1]))[0]\n\n'
                 'mixup, cutmix = mix(False), mix(True)\n'
                 'erased = NotNormalizedRandomErasing(1.0, mode="pixel")(clean.clone())'),
        ("code", 'rows = [("clean", clean), ("RandAugment", randaug[::2]), ("RandAugment", randaug[1::2]),\n'
                 '        ("MixUp", mixup), ("CutMix", cutmix), ("random erasing", erased)]\n'
                 'with plt.rc_context(plots.STYLE):\n'
                 '    fig, axes = plt.subplots(2, len(rows), figsize=(plots.TEXT_WIDTH, 2.6))\n'
                 '    for j, (title, batch) in enumerate(rows):\n'
                 '        for i in range(2):\n'
                 '            axes[i, j].imshow(batch[i].permute(1, 2, 0).clamp(0, 1).numpy())\n'
                 '            axes[i, j].axis("off")\n'
                 '        axes[0, j].set_title(title)\n'
                 '    fig.tight_layout()'),
    ],
}


def build(name: str, cells: List[Cell]) -> nbformat.NotebookNode:
    """One notebook; cell ids are fixed (``<name>-<i>``) so regenerating changes nothing."""
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name}-{i}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def write_all(out_dir: str = HERE) -> List[str]:
    """Write every notebook into ``out_dir`` (created if needed); returns their paths.

    Every target is checked before the first is written, and each is written atomically, so a bad
    ``--out`` or a kill never leaves a half-written notebook (``src.errors.UsageError`` on bad input)."""
    texts = {}
    for name, cells in NOTEBOOKS.items():
        nb = build(name, cells)
        nbformat.validate(nb)
        text = nbformat.writes(nb)
        texts[storage.join(out_dir, f"{name}.ipynb")] = text if text.endswith("\n") else text + "\n"
    storage.check_output_folder(out_dir, "--out")
    for path in texts:
        storage.check_output_file(path, "--out")
    for path, text in texts.items():
        storage.atomic_write_text(path, text)
    return list(texts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser.common import CliParser
    from src.arg_parser.values import REQUIRED_OUTPUT_PATH

    p = CliParser(prog="make_notebooks.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=HERE, type=REQUIRED_OUTPUT_PATH, metavar="DIR",
                   help="output folder (default: notebooks/)")
    for written in write_all(p.parse_args(argv).out):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
