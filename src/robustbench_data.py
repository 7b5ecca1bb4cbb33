"""RobustBench's example sets, read the way ``robustbench`` reads them (without the package).

CIFAR-10 / CIFAR-100: the test set in torchvision's on-disk format
(``<data-dir>/cifar-10-batches-py/test_batch``, ``<data-dir>/cifar-100-python/test``), the first
``n_examples`` in file order, ``ToTensor`` only. ImageNet: RobustBench's fixed list of 5000
validation images (``data/robustbench_imagenet_5000_ids.txt``, lines ``<wnid>/<file>``, read from
``<data-dir>/val/<wnid>/<file>`` like RobustBench's ``CustomImageFolder``), labels from
``data/imagenet_class_to_id_map.json`` (wnid -> class index), the first ``n_examples`` in list
order, preprocessed with ``Resize(floor(size / crop_pct), interpolation) + CenterCrop(size) +
ToTensor`` from the model's data config (RobustBench's rule for timm models).

ImageNet from TFDS (``--dataset tfds/<name>[:version]``): the same ids, order, labels and
preprocessing, the images picked by their ``file_name`` feature from a built TFDS dataset that
holds them (``tfds/robustbench_image_net`` from ``datasets/``, or TFDS's ``imagenet2012``) and
decoded with PIL from the stored JPEG bytes, as the folder path decodes the files.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from src import storage
from src.errors import UsageError
from src.tfds_data import describe_data_dir, first_line, is_tfds

_logger = logging.getLogger("robust_vits")

__all__ = ["REPO_ROOT", "IMAGENET_IDS_FILE", "IMAGENET_CLASS_MAP_FILE", "DATASETS", "DEFAULT_N_EXAMPLES",
           "sha256_text", "expand_path", "ExampleSet", "CifarTestSet", "ImageNetSubset", "TfdsImageNetSubset",
           "protocol_dataset", "load_imagenet_ids", "load_imagenet_class_map", "imagenet_transform", "InModelResize",
           "load_examples", "load_chunk"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IMAGENET_IDS_FILE = os.path.join(REPO_ROOT, "data", "robustbench_imagenet_5000_ids.txt")


IMAGENET_CLASS_MAP_FILE = os.path.join(REPO_ROOT, "data", "imagenet_class_to_id_map.json")


DATASETS = ("cifar10", "cifar100", "imagenet")


DEFAULT_N_EXAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}


DEFAULT_TFDS_SPLIT = "validation"


def protocol_dataset(dataset: str) -> str:
    """The RobustBench dataset a ``--dataset`` value evaluates: a ``tfds/...`` dataset holds its ImageNet images."""
    return "imagenet" if is_tfds(dataset) else dataset


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "test_batch", "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", "test", "fine_labels", "CIFAR100"),
}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expand_path(path: str) -> str:
    return os.path.expanduser(str(path)) if storage.is_local(str(path)) else str(path)


class ExampleSet(torch.utils.data.Dataset):
    """The protocol's ordered example list: ``self[i] -> (image tensor, label)`` for i < n."""

    name: str = ""
    n_examples: int = 0
    source: str = ""
    examples_sha256: str = ""
    data_check: str = ""

    def __len__(self) -> int:
        return self.n_examples

    def labels(self) -> List[int]:
        raise NotImplementedError

    def provenance(self) -> Dict[str, Any]:
        return {"dataset": self.name, "n_examples": self.n_examples, "source": self.source,
                "examples_sha256": self.examples_sha256, "data_check": self.data_check}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python pickles hold a dict of numpy arrays and lists: allow nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


class CifarTestSet(ExampleSet):
    """CIFAR-10/100 test images from torchvision's python-pickle files, ``ToTensor`` only.

    torchvision's ``CIFAR10(download=False)`` refuses any folder whose *training* files are
    missing or differ from the official md5 sums; RobustBench needs only the test file, so it is
    read directly (same format: ``data`` uint8 (N, 3072) in CHW order, ``labels`` /
    ``fine_labels``). Its md5 is compared with the official one and the outcome reported.
    """

    def __init__(self, dataset: str, data_dir: str, n_examples: Optional[int] = None):
        import numpy as np

        folder, filename, label_key, tv_name = _CIFAR_FILES[dataset]
        path = storage.join(expand_path(data_dir), folder, filename)
        pretty = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
        if not storage.exists(path):
            raise UsageError(f"{pretty} test set not found: looked for {path}; download it with python -c \"import "
                             f"torchvision; torchvision.datasets.{tv_name}('{data_dir}', train=False, download=True)\" "
                             f"or pass --data-dir")
        try:  # a folder in the file's place, or a file without read permission: one line, not a traceback
            raw = storage.read_bytes(path)
        except OSError as e:
            raise UsageError(f"{path} cannot be read as the {pretty} test batch ({e.strerror or type(e).__name__}); "
                             f"it must be torchvision's python-format file") from None
        try:
            entry = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(v) for v in entry[label_key]]
        except Exception as e:  # noqa: BLE001 - any decoding problem means a bad file
            raise UsageError(f"{path} is not a {pretty} test batch in torchvision's python format "
                             f"({type(e).__name__}: {str(e)[:100]})") from None
        if len(labels) != len(data):
            raise UsageError(f"{path} holds {len(data)} images but {len(labels)} labels")
        available = len(data)
        if n_examples is None:
            n_examples = min(DEFAULT_N_EXAMPLES[dataset], available)
            if n_examples < DEFAULT_N_EXAMPLES[dataset]:
                _logger.warning("%s holds only %d test images (RobustBench uses %d)", path, available,
                                DEFAULT_N_EXAMPLES[dataset])
        elif n_examples > available:
            raise UsageError(f"--n-examples {n_examples} is more than the {available} test images in {path}")
        self._images = data[:n_examples]
        self._labels = labels[:n_examples]
        self.name = dataset
        self.n_examples = int(n_examples)
        self.path = path
        self.source = f"{pretty} test set ({folder}/{filename}), first {n_examples} images in file order"
        self.examples_sha256 = sha256_text("\n".join(str(i) for i in range(n_examples)))
        import torchvision.datasets as tvd

        official = dict(getattr(tvd, tv_name).test_list)[filename]
        md5 = hashlib.md5(raw).hexdigest()
        self.file_md5 = md5
        self.data_check = "official test file (md5 matches torchvision's)" if md5 == official else \
            f"md5 {md5} differs from the official test file's {official}: not comparable with RobustBench"
        if md5 != official:
            _logger.warning("%s: %s", path, self.data_check)

    def labels(self) -> List[int]:
        return list(self._labels)

    def __getitem__(self, i: int):
        if not 0 <= i < self.n_examples:
            raise IndexError(i)
        x = torch.from_numpy(self._images[i].astype("float32") / 255.0)
        return x, self._labels[i]


def load_imagenet_ids(path: str = IMAGENET_IDS_FILE) -> List[str]:
    """RobustBench's ImageNet subset: ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` per line, in order."""
    with open(path, "r", encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    return ids


def load_imagenet_class_map(path: str = IMAGENET_CLASS_MAP_FILE) -> Dict[str, int]:
    """wnid (``n01440764``) -> class index (0..999), the standard sorted-wnid order."""
    with open(path, "r", encoding="utf-8") as f:
        return {str(k): int(v) for k, v in json.load(f).items()}


class _RobustBenchImageNet(ExampleSet):
    """What both sources of RobustBench's ImageNet images share: the first ``n_examples`` ids of the
    list in its order, their labels from the class map, the list's hash in the provenance."""

    def _select(self, n_examples: Optional[int], ids_file: str, class_map_file: str) -> Dict[str, int]:
        """Set ``ids``, ``n_examples``, ``_labels`` and the hashes; returns the class map."""
        ids = load_imagenet_ids(ids_file)
        class_map = load_imagenet_class_map(class_map_file)
        n_examples = DEFAULT_N_EXAMPLES["imagenet"] if n_examples is None else n_examples
        if n_examples > len(ids):
            raise UsageError(f"--n-examples {n_examples}: RobustBench's ImageNet subset has {len(ids)} images")
        ids = ids[:n_examples]
        for entry in ids:
            if entry.split("/", 1)[0] not in class_map:
                raise UsageError(f"{ids_file}: class {entry.split('/', 1)[0]} of {entry} is not in {class_map_file}")
        self.name = "imagenet"
        self.ids = ids
        self.n_examples = int(n_examples)
        self._labels = [class_map[entry.split("/", 1)[0]] for entry in ids]
        with open(ids_file, "rb") as f:
            self.ids_file_sha256 = hashlib.sha256(f.read()).hexdigest()
        self.examples_sha256 = sha256_text("\n".join(ids))
        return class_map

    def labels(self) -> List[int]:
        return list(self._labels)

    def provenance(self) -> Dict[str, Any]:
        out = super().provenance()
        out["ids_file_sha256"] = self.ids_file_sha256
        return out


class ImageNetSubset(_RobustBenchImageNet):
    """The first ``n_examples`` of RobustBench's 5000 ImageNet validation images."""

    def __init__(self, data_dir: str, transform: Callable, n_examples: Optional[int] = None,
                 ids_file: str = IMAGENET_IDS_FILE, class_map_file: str = IMAGENET_CLASS_MAP_FILE):
        self._select(n_examples, ids_file, class_map_file)
        ids, n_examples = self.ids, self.n_examples
        root = storage.join(expand_path(data_dir), "val")
        if not storage.isdir(root):
            raise UsageError(f"ImageNet validation images not found: looked for {root}/<wnid>/<file> (e.g. "
                             f"{storage.join(root, ids[0] if ids else '')}); RobustBench expects the ILSVRC2012 "
                             f"validation set sorted into one folder per class under <data-dir>/val")
        self._paths = [storage.join(root, *entry.split("/")) for entry in ids]
        if storage.is_local(root):
            missing = [p for p in self._paths if not os.path.isfile(p)]
            if missing:
                raise UsageError(f"{len(missing)} of the {n_examples} RobustBench ImageNet images are missing under "
                                 f"{root} (first: {missing[0]}); the validation set must be sorted into "
                                 f"<wnid>/ folders")
        self.transform = transform
        self.root = root
        self.source = (f"RobustBench ImageNet subset (data/{os.path.basename(ids_file)}), first {n_examples} ids "
                       f"in list order, from {root}")
        self.data_check = f"{n_examples} image files present" if storage.is_local(root) else "not checked (remote)"

    def __getitem__(self, i: int):
        from src.image_folder import ImageReadError, load_rgb_image

        path = self._paths[i]
        try:  # load_rgb_image: one line naming the file (also from a loader worker), 16-bit images scaled
            with storage.open_file(path, "rb") as f:
                img = load_rgb_image(f, path)
        except OSError as e:
            raise ImageReadError(f"cannot read ImageNet image {path}: {e.strerror or e}") from None
        return self.transform(img), self._labels[i]


class TfdsImageNetSubset(_RobustBenchImageNet):
    """The first ``n_examples`` of RobustBench's 5000 ImageNet ids, read from a built TFDS dataset.

    The dataset needs ``image``, ``label`` and ``file_name`` features and the ids' files in ``split``
    (TFDS's stored order does not matter: examples are picked by file name and put in the list's
    order). Labels come from the class map like the folder path's; the dataset's own label must name
    the same class. One pass over the split keeps the selected images' encoded bytes in memory (about
    0.7 GB for all 5000 full-size ImageNet JPEGs); PIL decodes them exactly as it decodes the files.
    """

    def __init__(self, spec: str, data_dir: Optional[str], split: str, transform: Callable,
                 n_examples: Optional[int] = None, ids_file: str = IMAGENET_IDS_FILE,
                 class_map_file: str = IMAGENET_CLASS_MAP_FILE):
        from src.tfds_data import check_split, open_builder

        class_map = self._select(n_examples, ids_file, class_map_file)
        ids, n_examples = self.ids, self.n_examples
        where = describe_data_dir(data_dir)
        builder = open_builder(spec, data_dir)
        check_split(builder, spec, split, data_dir)
        features = builder.info.features
        missing_features = [k for k in ("image", "label", "file_name") if k not in features]
        if missing_features:
            raise UsageError(f"{spec} in {where} has no {', '.join(missing_features)} feature: RobustBench's ImageNet "
                             "images are picked by file name (use tfds/robustbench_image_net or tfds/imagenet2012)")
        wnids = [entry.split("/", 1)[0] for entry in ids]
        self._images = self._read(builder, spec, split, where, ids, wnids, class_map)
        self.transform = transform
        version = f"{builder.info.name}{'/' + builder.info.config_name if builder.info.config_name else ''}" \
                  f":{builder.info.version}"
        self.tfds = {"dataset": f"tfds/{version}", "split": split, "data_dir": str(data_dir) if data_dir else where}
        self.source = (f"RobustBench ImageNet subset (data/{os.path.basename(ids_file)}), first {n_examples} ids "
                       f"in list order, from tfds/{version} split '{split}' in {where}")
        self.data_check = f"{n_examples} images found by file name in the split"

    @staticmethod
    def _read(builder, spec: str, split: str, where: str, ids: List[str], wnids: List[str],
              class_map: Dict[str, int]) -> List[bytes]:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        index = {entry.split("/", 1)[1]: i for i, entry in enumerate(ids)}
        label_feature = builder.info.features["label"]
        names = list(getattr(label_feature, "names", None) or [])
        by_name = set(wnids) <= set(names)  # ImageNet ClassLabels are named by wnid
        images: List[Optional[bytes]] = [None] * len(ids)
        found = 0
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        try:  # a gs:// read that fails or a damaged record file: TensorFlow's OpError
            for ex in tfds.as_numpy(ds):
                file_name = ex["file_name"].decode() if isinstance(ex["file_name"], bytes) else str(ex["file_name"])
                i = index.get(os.path.basename(file_name))
                if i is None:
                    continue
                if images[i] is not None:
                    raise UsageError(f"{file_name} appears twice in split '{split}' of {spec} in {where}")
                label = int(ex["label"])
                ok = names[label] == wnids[i] if by_name else label == class_map[wnids[i]]
                if not ok:
                    got = names[label] if by_name else label
                    raise UsageError(f"{spec} in {where} labels {file_name} {got}, RobustBench's list says {wnids[i]} "
                                     f"(class {class_map[wnids[i]]}): not the ImageNet validation labels")
                images[i] = bytes(ex["image"])
                found += 1
                if found == len(ids):  # every id is in: the rest of the split (45,000 images of ImageNet) is not read
                    break
        except tf.errors.OpError as e:
            raise UsageError(f"cannot read split '{split}' of {spec} in {where}: {first_line(e)}") from None
        missing = [ids[i] for i, img in enumerate(images) if img is None]
        if missing:
            raise UsageError(f"{len(missing)} of the {len(ids)} RobustBench ImageNet images are not in split "
                             f"'{split}' of {spec} in {where} (first: {missing[0]}); build tfds/robustbench_image_net "
                             "(datasets/robustbench_image_net) or use TFDS's imagenet2012 validation split")
        return images  # type: ignore[return-value]

    def provenance(self) -> Dict[str, Any]:
        out = super().provenance()
        out["tfds"] = dict(self.tfds)
        return out

    def __getitem__(self, i: int):
        from src.image_folder import load_rgb_image

        # load_rgb_image: one line naming the example (ImageReadError survives a loader worker), 16-bit scaled
        img = load_rgb_image(io.BytesIO(self._images[i]), f"{self.ids[i]} from {self.tfds['dataset']}")
        return self.transform(img), self._labels[i]


def imagenet_transform(data_config: Dict[str, Any], normalize: Optional[Tuple[Sequence[float], Sequence[float]]]
                       ) -> Tuple[Callable, str]:
    """Resize(floor(size / crop_pct), interpolation) + CenterCrop(size) + ToTensor [+ Normalize]."""
    from torchvision import transforms

    from src.data import build_eval_transform

    tf = build_eval_transform(data_config)
    size = data_config["input_size"][-1]
    crop_pct = data_config.get("crop_pct") or 1.0
    interp = data_config.get("interpolation") or "bilinear"
    desc = f"Resize({math.floor(size / crop_pct)}, {interp}) + CenterCrop({size}) + ToTensor"
    if normalize is not None:
        mean, std = (tuple(float(v) for v in normalize[0]), tuple(float(v) for v in normalize[1]))
        tf = transforms.Compose(list(tf.transforms) + [transforms.Normalize(mean, std)])
        desc += f" + Normalize(mean={list(mean)}, std={list(std)})"
    return tf, desc


class InModelResize(nn.Module):
    """``--upsample-in-model``: Resize(floor(size / crop_pct)) + CenterCrop(size) as the model's first
    (differentiable) layer, so attacks perturb the dataset's native pixels (32x32 for CIFAR)."""

    def __init__(self, size: int, crop_pct: float, interpolation: str):
        super().__init__()
        self.size = int(size)
        self.resize_to = int(math.floor(size / (crop_pct or 1.0)))
        self.interpolation = interpolation or "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation) if self.interpolation in ("nearest", "bilinear", "bicubic") \
            else InterpolationMode.BILINEAR
        x = TF.resize(x, [self.resize_to], interpolation=mode, antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def extra_repr(self) -> str:
        return f"resize={self.resize_to}, crop={self.size}, interpolation={self.interpolation}"


def load_examples(dataset: str, data_dir: Optional[str], n_examples: Optional[int],
                  transform: Optional[Callable] = None, split: Optional[str] = None) -> ExampleSet:
    """The protocol's examples for ``dataset`` ('cifar10', 'cifar100', 'imagenet' or 'tfds/<name>[:version]',
    the latter from ``split``, default 'validation')."""
    if dataset in ("cifar10", "cifar100"):
        return CifarTestSet(dataset, data_dir, n_examples)
    if protocol_dataset(dataset) == "imagenet" and transform is None:
        raise ValueError("ImageNet examples need a transform")
    if dataset == "imagenet":
        return ImageNetSubset(data_dir, transform, n_examples)
    if is_tfds(dataset):
        return TfdsImageNetSubset(dataset, expand_path(data_dir) if data_dir else None, split or DEFAULT_TFDS_SPLIT,
                                  transform, n_examples)
    raise UsageError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")


def load_chunk(examples: ExampleSet, start: int, end: int, workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of examples ``start .. end - 1`` as two tensors."""
    subset = torch.utils.data.Subset(examples, range(start, end))
    if workers > 0 and end - start > 1:
        loader = torch.utils.data.DataLoader(subset, batch_size=end - start, shuffle=False, num_workers=workers)
        x, y = next(iter(loader))
        return x, torch.as_tensor(y, dtype=torch.long)
    items = [subset[i] for i in range(len(subset))]
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items], dtype=torch.long)
