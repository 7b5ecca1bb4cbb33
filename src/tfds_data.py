"""``tfds/<name>[/<config>][:<version>]`` datasets: opening a built one, and one-line errors for the rest.

A data dir goes to TFDS exactly as given (a local path or a ``gs://`` URL): nothing here makes it
absolute or checks it with ``os.path``; ``None`` means TFDS's default (``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``). TensorFlow is imported only inside these functions, after torch,
torchvision and timm (the other order segfaults once torch loads triton).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from src.errors import UsageError

PREFIX = "tfds/"
HOW_TO_BUILD = ("build it with `tfds build` or `python datasets/build.py datasets/<name>` (README, TFDS datasets), "
                "or pass the data dir that holds it")


def is_tfds(name: Optional[str]) -> bool:
    return str(name or "").lower().startswith(PREFIX)


def parse_name(spec: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``[tfds/]name[/config][:version]`` -> (name, config, version)."""
    spec = spec[len(PREFIX):] if is_tfds(spec) else spec
    spec, _, version = spec.partition(":")
    name, _, config = spec.partition("/")
    return name, config or None, version or None


def describe_data_dir(data_dir: Optional[str]) -> str:
    if data_dir:
        return str(data_dir)
    import_tfds()
    from tensorflow_datasets.core import constants

    return f"TFDS's default data dir {constants.DATA_DIR}"


def import_tfds():
    """``tensorflow_datasets``, imported after torch / torchvision / timm; a one-line ``UsageError`` naming
    the optional requirements file when TensorFlow or TFDS is not installed."""
    import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
    import torchvision  # noqa: F401
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UsageError(f"tfds/ datasets need tensorflow and tensorflow-datasets, which did not import "
                         f"({type(e).__name__}: {first_line(e)}); install them with "
                         "pip install -r requirements-tfds.txt") from None
    return tfds


def _builds(name: str, data_dir: Optional[str], suffix: str) -> Optional[List[str]]:
    """``[config/]version`` of every folder ``<version><suffix>`` of ``name`` in ``data_dir`` holding a
    dataset_info.json, sorted; None when the data dir cannot be listed."""
    import_tfds()
    import tensorflow as tf
    from tensorflow_datasets.core import constants

    root = f"{str(data_dir or constants.DATA_DIR).rstrip('/')}/{name}"
    tail = f"{suffix}/dataset_info.json"
    found = []
    try:
        for pattern in (f"{root}/*{tail}", f"{root}/*/*{tail}"):
            found += [path[len(root) + 1:-len(tail)] for path in tf.io.gfile.glob(pattern)]
    except (tf.errors.OpError, OSError, ValueError):
        return None
    # only versions as TFDS writes them (x.y.z): with no suffix, not datasets/build.py's
    # '<version>.replaced-by-overwrite' or TFDS's own temporary '<version>.incomplete*' folders
    return sorted(b for b in found if re.fullmatch(r"\d+\.\d+\.\d+", b.split("/")[-1]))


def built_versions(name: str, data_dir: Optional[str]) -> Optional[List[str]]:
    """``[config/]version`` of every build of ``name`` in ``data_dir`` (folders with a dataset_info.json),
    sorted; None when the data dir cannot be listed."""
    return _builds(name, data_dir, "")


REPLACED_SUFFIX = ".replaced-by-overwrite"  # datasets/build.py --overwrite: the previous build until the new one completes


def set_aside_builds(name: str, data_dir: Optional[str]) -> Optional[List[str]]:
    """``[config/]version`` of every build of ``name`` that ``datasets/build.py --overwrite`` moved aside and did not
    put back (the process was killed): ``<version>.replaced-by-overwrite`` folders with a dataset_info.json."""
    return _builds(name, data_dir, REPLACED_SUFFIX)


def _matches(build: str, config: Optional[str], version: Optional[str]) -> bool:
    parts = build.split("/")
    return (version is None or parts[-1] == version) and (config is None or (len(parts) == 2 and parts[0] == config))


def missing_build_message(spec: str, data_dir: Optional[str]) -> Optional[str]:
    """Why ``spec`` is not in ``data_dir`` (which builds of the dataset are there, if any); None when a
    matching build is there or the data dir cannot be listed."""
    name, config, version = parse_name(spec)
    builds = built_versions(name, data_dir)
    if builds is None or any(_matches(b, config, version) for b in builds):
        return None
    where = describe_data_dir(data_dir)
    aside = [b for b in (set_aside_builds(name, data_dir) or []) if _matches(b, config, version)]
    if aside:  # what a killed `datasets/build.py --overwrite` leaves: the previous build, under another name
        return (f"tfds/{name}: the build {aside[0]} in {where} was moved aside to {aside[0]}{REPLACED_SUFFIX} by a "
                f"--overwrite build that was killed; move it back to {aside[0]} (or delete it and build again)")
    if not builds:
        return f"tfds/{name} is not built in {where}; {HOW_TO_BUILD}"
    asked = f"tfds/{name}{'/' + config if config else ''}{':' + version if version else ''}"
    return f"{asked} is not in {where} (built there: {', '.join(builds)})"


def open_builder(spec: str, data_dir: Optional[str]):
    """The built TFDS dataset ``spec`` in ``data_dir``; a one-line ``UsageError`` when it is not there."""
    tfds = import_tfds()
    import tensorflow as tf

    name = spec[len(PREFIX):] if is_tfds(spec) else spec
    where = describe_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, AssertionError, OSError, tf.errors.OpError) as e:  # DatasetNotFoundError is a ValueError;
        # OpError: TensorFlow's file system failed (a gs:// data dir unreachable or without credentials)
        raise UsageError(missing_build_message(spec, data_dir) or f"cannot open tfds/{name} in {where}: "
                         f"{first_line(e)}") from None
    if not builder.info.splits:  # a registered TFDS dataset (cifar10, imagenet2012, ...) not prepared there
        raise UsageError(missing_build_message(spec, data_dir) or f"tfds/{name} in {where} has no splits (not "
                         f"prepared there); {HOW_TO_BUILD}")
    return builder


def check_split(builder, spec: str, split: str, data_dir: Optional[str]) -> None:
    """A one-line ``UsageError`` when ``split`` (TFDS slicing included) does not select examples of ``builder``:
    an unknown split, a slice TFDS cannot parse or that runs past the split, and an empty one (``train[5:5]``,
    ``train[64:]`` of 64 examples), which TFDS accepts here and refuses with a traceback when it is read."""
    available = ", ".join(f"{k} ({v.num_examples} examples)" for k, v in builder.info.splits.items())
    try:
        selected = builder.info.splits[split].num_examples
    except (ValueError, KeyError, AssertionError) as e:
        raise UsageError(f"{first_line(e)} ({spec} in {describe_data_dir(data_dir)} has the splits: {available})") \
            from None
    if not selected:
        raise UsageError(f"split '{split}' selects no examples of {spec} in {describe_data_dir(data_dir)} (its "
                         f"splits: {available})")


def check_trainable(dataset, spec: str) -> None:
    """Training reads a tfds dataset with shuffled files (timm's reader), which TFDS refuses for a dataset
    stored in a fixed order: say so in one line instead of failing at the first batch."""
    builder = getattr(getattr(dataset, "reader", None), "builder", None)
    if builder is not None and getattr(builder.info, "disable_shuffling", False):
        raise UsageError(f"{spec} is stored in a fixed order (built with disable_shuffling) and TFDS does not read "
                         "such a dataset with shuffled files, as training does; train on a build without "
                         "disable_shuffling (evaluating on this one works)")


def _shipped_label_names(name: str) -> Optional[List[str]]:
    """The label names the builder of ``datasets/<name>`` stores, for the builders whose names are data files."""
    from src import tfds_imagenet

    if name == "image_net_subset":
        return tfds_imagenet.read_subset_synsets()
    if name == "robustbench_image_net":
        return tfds_imagenet.imagenet_label_names()
    return None


def check_label_names(builder, spec: str, data_dir: Optional[str]) -> None:
    """Warn when a build of one of ``datasets/``'s builders stores other label names, or the same in another order,
    than the builder here: label index i then means another class (the original's image_net_subset, for one,
    ordered its 100 synsets by Python's string hashing, and shares the version 5.1.0), so a model trained on one
    build is scored against the wrong labels on the other, without an error."""
    import logging

    name, _, _ = parse_name(spec)
    expected = _shipped_label_names(name)
    label = builder.info.features["label"] if "label" in getattr(builder.info, "features", {}) else None
    stored = list(getattr(label, "names", None) or [])
    if expected is None or not stored or stored == expected:
        return
    index = next(i for i in range(max(len(stored), len(expected)))
                 if i >= len(stored) or i >= len(expected) or stored[i] != expected[i])
    how = "the same classes in another order" if sorted(stored) == sorted(expected) else "other classes"
    logging.getLogger("robust_vits").warning(
        "%s in %s was not built by datasets/%s (but by an older or the original builder?): it stores %s (label %d "
        "is %s there, %s here), so a model trained on one of the two builds is scored against the wrong labels on "
        "the other; rebuild it with python datasets/build.py datasets/%s --overwrite", spec,
        describe_data_dir(data_dir), name, how, index, stored[index] if index < len(stored) else "missing",
        expected[index] if index < len(expected) else "missing", name)


def first_line(e: BaseException) -> str:
    text = str(e).strip().strip('"').strip()
    return text.splitlines()[0] if text else type(e).__name__


def explain_error(spec: str, data_dir: Optional[str], split: str, error: BaseException) -> Optional[str]:
    """A clearer one-line message for timm's failure to open ``spec`` (None: keep the original message).

    Dataset, config or version missing from the data dir: which builds are there; split unknown or
    sliced out of range: the splits there are.
    """
    try:
        missing = missing_build_message(spec, data_dir)
        if missing:
            return missing
        text = str(error).lower()
        if "split" in text or "slice" in text:
            check_split(open_builder(spec, data_dir), spec, split, data_dir)
    except UsageError as e:
        return str(e)
    except Exception:  # noqa: BLE001 - only a better message was being looked for
        return None
    return None
