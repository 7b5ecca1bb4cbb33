"""``tfds build`` for the builders in this folder: TFDS's own build command and flags, without TFDS's entry point.

tensorflow-datasets 4.9.10's ``tfds`` entry point imports apache-beam (its ``convert_format``
command subclasses ``beam.DoFn`` when imported) and mlcroissant at start-up and stops without them;
apache-beam needs older protobuf / pillow / pyarrow than this project's environment, so it is not
installed. This runs TFDS's ``build`` command alone, with its flags (``--data_dir``,
``--manual_dir``, ``--config`` a name or a JSON of config fields, ...), torch / torchvision / timm
imported before TensorFlow. Where apache-beam is installed, ``cd datasets/<name> && tfds build ...``
builds the same datasets.

    python datasets/build.py datasets/cifar_ddpm --manual_dir DIR --data_dir OUT
    python datasets/build.py datasets/imagenet_advex --config resnet50_fgsm --manual_dir CKPTS --data_dir OUT
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402,F401  (torch / torchvision / timm before tensorflow)
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
from absl import app  # noqa: E402
from tensorflow_datasets.scripts.cli import build, cli_utils  # noqa: E402


def main(args: build.Args) -> None:
    import tensorflow_datasets as tfds

    tfds.core.visibility.set_availables([tfds.core.visibility.DatasetType.TFDS_PUBLIC,
                                         tfds.core.visibility.DatasetType.COMMUNITY_PUBLIC])
    args.execute()


if __name__ == "__main__":
    app.run(main, flags_parser=cli_utils.make_flags_parser(build.Args, description=__doc__.splitlines()[0]))
