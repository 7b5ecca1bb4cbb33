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
import signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402,F401  (torch / torchvision / timm before tensorflow)
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
from absl import app  # noqa: E402
from tensorflow_datasets.scripts.cli import build, cli_utils  # noqa: E402


from src.errors import ExpectedError, Interrupted, UsageError, first_line, sigterm_as_interrupt  # noqa: E402
from src.tfds_data import REPLACED_SUFFIX  # noqa: E402  (the readers name a build a killed --overwrite left aside)


def check_inputs(args: build.Args) -> None:
    """What TFDS would report with a traceback, checked before anything is built: every dataset is a
    builder (a folder of datasets/, a builder script or a registered name), ``--config`` is one of its
    configs, a given ``--manual_dir`` is an existing folder (not empty where the builder reads it), and the
    folders it writes to (``--data_dir``, ``--download_dir``, ``--extract_dir``) can be created and written."""
    import tensorflow_datasets as tfds

    from src import storage

    for flag, folder in (("--data_dir", args.paths.data_dir), ("--download_dir", args.paths.download_dir),
                         ("--extract_dir", args.paths.extract_dir)):
        if folder:  # where the build writes: a file in the way is one line, not TFDS's traceback mid-build
            storage.check_output_folder(os.path.expanduser(str(folder)), flag)
    if args.automation.exclude_datasets:
        return
    config = args.generation.config
    manual = args.paths.manual_dir
    for name in args.positional_datasets + args.datasets or [""]:
        try:
            cls, kwargs = build._get_builder_cls_and_kwargs(name, has_imports=bool(args.generation.imports))
        except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError, ImportError) as e:
            raise UsageError(f"{name or 'the current folder'} is not a dataset builder ({first_line(e)}); pass a "
                             "folder of datasets/, e.g. datasets/cifar_ddpm") from None
        configs = [c.name for c in cls.BUILDER_CONFIGS or ()]
        if config and not config.lstrip().startswith("{") and config not in configs:
            raise UsageError(f"--config {config} is not a config of {cls.name} "
                             f"({'its configs: ' + ', '.join(configs) if configs else 'it has none'})")
        if manual is not None and not str(manual).startswith(("gs://", "s3://")):
            if not os.path.isdir(manual):
                raise UsageError(f"--manual_dir {manual} is not an existing folder")
            if getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not os.listdir(manual):
                raise UsageError(f"--manual_dir {manual} is empty; {cls.name} reads its source files from there")


# TFDS's own _make_builder, also when this module is loaded again in one process (tests): not a wrapper of a wrapper
_tfds_make_builder = build.__dict__.setdefault("_tfds_own_make_builder", build._make_builder)
_replaced = []  # (build folder, its previous contents moved aside) for every build --overwrite replaces


def _make_builder_keeping_the_old_build(builder_cls, overwrite: bool, fail_if_exists: bool, **builder_kwargs):
    """TFDS's ``_make_builder``, except that ``--overwrite`` moves an existing build aside instead of deleting it
    before the new one is generated: ``restore_replaced`` puts it back when the new build fails or is stopped."""
    builder = builder_cls(**builder_kwargs)
    path = builder.data_path
    backup = path.parent / (path.name + REPLACED_SUFFIX)
    prepared = builder.is_prepared()
    left_by_a_killed_run = backup.exists() and (path, backup) not in _replaced  # TFDS makes the builder twice
    if left_by_a_killed_run and (overwrite or not prepared):  # and maybe no build at all: not a new one next to it
        raise UsageError(f"{backup} holds the build an interrupted --overwrite build replaced; move it back "
                         f"to {path} or delete it, then build again")
    if overwrite and not fail_if_exists and prepared:
        path.rename(backup)
        _replaced.append((path, backup))
    return _tfds_make_builder(builder_cls, overwrite=overwrite, fail_if_exists=fail_if_exists, **builder_kwargs)


def restore_replaced() -> None:
    """After a run: a new build that completed (its dataset_info.json is there) replaces the old one for good;
    otherwise the old build goes back where it was."""
    while _replaced:
        path, backup = _replaced.pop()
        if (path / "dataset_info.json").exists():
            backup.rmtree()
        else:
            if path.exists():
                path.rmtree()
            backup.rename(path)
            print(f"{path}: the new build did not complete; the previous build is back in place", file=sys.stderr)


build._make_builder = _make_builder_keeping_the_old_build


def main(args: build.Args) -> None:
    import tensorflow_datasets as tfds

    tfds.core.visibility.set_availables([tfds.core.visibility.DatasetType.TFDS_PUBLIC,
                                         tfds.core.visibility.DatasetType.COMMUNITY_PUBLIC])
    try:
        with sigterm_as_interrupt():
            check_inputs(args)
            args.execute()
    except (ExpectedError, FileNotFoundError) as e:  # the builders name a missing source file this way
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C / SIGTERM: one line, 130 / 143, like the other CLIs
        what = first_line(e) if isinstance(e, Interrupted) else "stopped by Ctrl-C (SIGINT)"
        print(f"interrupted: {what}", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT)
    finally:  # --overwrite: the build it replaced comes back unless the new one completed
        restore_replaced()


if __name__ == "__main__":
    app.run(main, flags_parser=cli_utils.make_flags_parser(build.Args, description=__doc__.splitlines()[0]))
