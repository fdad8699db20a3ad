"""Member / holdout / test splits for gradguard's examples, demo and comparison.

A membership audit needs three disjoint sets drawn from one distribution: the
*members* the model trains on, a *holdout* of non-members it never sees (the audit's
negatives), and a *test* set for accuracy. :func:`make_split` builds them from tensors
with a seeded ``torch.Generator`` (the global RNG is never touched), and can plant
*canaries*, deliberately atypical examples, half among the members and half in the
holdout, so that their exposure can be measured as members against non-members:

- ``"mislabel"``: a real image with a wrong label (a uniformly drawn other class);
- ``"ood"``: an out-of-distribution input (uniform noise over the data's value range)
  with a random label.

:func:`load_dataset` returns such a split for scikit-learn's embedded 8×8 digits (no
files, no download) or, for users who have the files, MNIST, Fashion-MNIST and
CIFAR-10 read by ``torchvision.datasets`` with ``download=False``. gradguard never
downloads anything.

Every dataset is a plain ``TensorDataset(x, y)``, so dataset index ``i`` is row ``i``:
the index GradGuard's ledger uses. Inputs are float32 in ``[0, 1]``, unnormalised.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "CANARY_KINDS",
    "DATASET_NAMES",
    "MembershipSplit",
    "load_dataset",
    "load_digits_tensors",
    "make_split",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashionmnist", "cifar10")
CANARY_KINDS: tuple[str, ...] = ("mislabel", "ood")

# Default share of the rows for (train, holdout, test) when the test set comes out of
# the pool, and for (train, holdout) when it is a separate official test set: members
# and non-members in equal numbers, the usual membership-inference setup.
_POOL_FRACTIONS = (0.4, 0.3, 0.3)
_EXTERNAL_TEST_FRACTIONS = (0.5, 0.5)

# torchvision's on-disk layout (what its loaders read with download=False).
_MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


@dataclass(eq=False)
class MembershipSplit:
    """Members, non-members and a test set drawn from one pool, with canary positions.

    Attributes:
        name: the dataset's name (``"digits"``, ``"mnist"``, ... or ``"custom"``).
        train: the members, a ``TensorDataset(x, y)``: the model trains on these.
        holdout: non-members from the same distribution, never trained on: the
            negatives of a membership audit.
        test: examples for measuring accuracy.
        train_indices: ``[len(train)]`` long tensor, the pool row of each member, or
            ``-1`` for an ``"ood"`` canary (a synthetic input that is in no pool row).
            A ``"mislabel"`` canary keeps the row its image came from.
        holdout_indices: the same for ``holdout``.
        test_indices: rows of the test source: the pool when the test set was split
            from it, otherwise the separate (official) test set.
        train_canary_mask: ``[len(train)]`` bool tensor, True where a canary sits.
        holdout_canary_mask: ``[len(holdout)]`` bool tensor, True where a canary sits.
        canary_kind: ``"mislabel"``, ``"ood"``, or None when no canary was planted.
        num_classes: number of classes; labels are in ``[0, num_classes)``.
        input_shape: shape of one input, e.g. ``(1, 8, 8)``.
        seed: the seed the split was drawn with.
    """

    name: str
    train: TensorDataset
    holdout: TensorDataset
    test: TensorDataset
    train_indices: torch.Tensor
    holdout_indices: torch.Tensor
    test_indices: torch.Tensor
    train_canary_mask: torch.Tensor
    holdout_canary_mask: torch.Tensor
    canary_kind: str | None
    num_classes: int
    input_shape: tuple[int, ...]
    seed: int

    @property
    def num_canaries(self) -> int:
        """Canaries planted in train and holdout together."""
        return int(self.train_canary_mask.sum()) + int(self.holdout_canary_mask.sum())

    def summary(self) -> dict[str, Any]:
        """Sizes and settings for logs and reports (counts only, never examples).

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "name": self.name,
            "n_train": len(self.train),
            "n_holdout": len(self.holdout),
            "n_test": len(self.test),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "canary_kind": self.canary_kind,
            "train_canaries": int(self.train_canary_mask.sum()),
            "holdout_canaries": int(self.holdout_canary_mask.sum()),
            "seed": self.seed,
        }


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's embedded 8×8 handwritten digits as tensors (no download).

    Returns:
        ``(x, y)``: ``x`` float32 ``[1797, 1, 8, 8]`` in ``[0, 1]`` (the 0..16 pixel
        counts divided by 16), ``y`` long ``[1797]`` in ``0..9``.

    Example:
        >>> x, y = load_digits_tensors()
        >>> tuple(x.shape), int(y.max())
        ((1797, 1, 8, 8), 9)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target).to(torch.long)
    return x.contiguous(), y


def make_split(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_train: int | None = None,
    n_holdout: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    canaries: int = 0,
    canary_kind: str = "mislabel",
    num_classes: int | None = None,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_examples: int | None = None,
    name: str = "custom",
) -> MembershipSplit:
    """Partition a pool at random into members, holdout and test, and plant canaries.

    Sizes left as None share the rows that the given sizes leave free, in proportion
    to the defaults: 40% train / 30% holdout / 30% test, or, when ``test_data`` supplies
    a separate test set, 50% train / 50% holdout of the pool (and the whole test set).
    Rows left over are unused. Canaries replace rows inside train and holdout, so the
    sizes include them. The partition is drawn before the canaries, so the same seed
    gives the same partition whatever ``canaries`` is.

    Args:
        x: ``[N, ...]`` inputs: floating point, or uint8 images (0..255), which are
            scaled to float32 in ``[0, 1]`` after the rows are chosen, so a subsample of
            a large uint8 pool is never converted whole.
        y: ``[N]`` integer class labels.
        n_train: number of members.
        n_holdout: number of non-members (must be at least 1: the audit needs them).
        n_test: number of test examples (0 allowed).
        seed: seed of the ``torch.Generator`` that draws everything.
        canaries: total canaries; ``ceil(canaries / 2)`` go into train and the rest
            into the holdout.
        canary_kind: ``"mislabel"`` (real input, wrong label) or ``"ood"`` (uniform
            noise over the range of ``x``, random label).
        num_classes: number of classes; defaults to ``max(label) + 1``.
        test_data: optional separate ``(x_test, y_test)``; then the pool ``x, y`` only
            supplies train and holdout.
        max_examples: use at most this many rows of the pool (and of ``test_data``),
            a random subsample; size defaults are shares of this smaller pool.
        name: a name carried into the split and its summary.

    Returns:
        A :class:`MembershipSplit`.

    Raises:
        TypeError: ``x`` or ``y`` has the wrong dtype, or an argument the wrong type.
        ValueError: shapes disagree, labels are out of range, the sizes do not fit the
            pool, or the canaries do not fit train / holdout.

    Example:
        >>> x, y = load_digits_tensors()
        >>> split = make_split(x, y, seed=0, canaries=20, canary_kind="ood")
        >>> len(split.train), len(split.holdout), len(split.test)
        (719, 539, 539)
        >>> int(split.train_canary_mask.sum()), int(split.holdout_canary_mask.sum())
        (10, 10)
    """
    _check_xy(x, y, "x", "y")
    seed = _check_int(seed, "seed")
    canaries = _check_int(canaries, "canaries", minimum=0)
    if max_examples is not None:
        max_examples = _check_int(max_examples, "max_examples", minimum=1)
    if canary_kind not in CANARY_KINDS:
        raise ValueError(f"canary_kind must be one of {CANARY_KINDS}, got {canary_kind!r}")
    if test_data is not None:
        if not (isinstance(test_data, (tuple, list)) and len(test_data) == 2):
            raise TypeError("test_data must be a pair (x_test, y_test) of tensors")
        x_test_src, y_test_src = test_data
        _check_xy(x_test_src, y_test_src, "test_data[0]", "test_data[1]")
        if tuple(x_test_src.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"test inputs have shape {tuple(x_test_src.shape[1:])} per example but the "
                f"pool has {tuple(x.shape[1:])}: both must hold the same kind of input"
            )
    else:
        x_test_src, y_test_src = x, y

    num_classes = _resolve_num_classes(num_classes, y, y_test_src)
    if canaries > 0 and canary_kind == "mislabel" and num_classes < 2:
        raise ValueError("mislabel canaries need at least 2 classes to pick a wrong label")

    n_pool = x.shape[0]
    pool_cap = n_pool if max_examples is None else min(n_pool, max_examples)
    if test_data is None:
        n_train, n_holdout, n_test = _resolve_sizes(
            (n_train, n_holdout, n_test), ("n_train", "n_holdout", "n_test"),
            _POOL_FRACTIONS, pool_cap, n_pool, max_examples,
        )
    else:
        n_train, n_holdout = _resolve_sizes(
            (n_train, n_holdout), ("n_train", "n_holdout"),
            _EXTERNAL_TEST_FRACTIONS, pool_cap, n_pool, max_examples,
        )
        n_test_available = x_test_src.shape[0]
        test_cap = n_test_available if max_examples is None else min(
            n_test_available, max_examples)
        if n_test is None:
            n_test = test_cap
        else:
            n_test = _check_int(n_test, "n_test", minimum=0)
            if n_test > test_cap:
                raise ValueError(
                    f"n_test={n_test} but the test set has {test_cap} usable rows "
                    f"({n_test_available} in total, max_examples={max_examples}): "
                    "lower n_test or raise max_examples"
                )
    if n_train < 1 or n_holdout < 1:
        raise ValueError(
            f"the split needs at least one member and one holdout example, got "
            f"n_train={n_train}, n_holdout={n_holdout}: pass larger sizes or more data"
        )
    k_train, k_holdout = (canaries + 1) // 2, canaries // 2
    if k_train > n_train or k_holdout > n_holdout:
        raise ValueError(
            f"{canaries} canaries put {k_train} into train (size {n_train}) and "
            f"{k_holdout} into holdout (size {n_holdout}): use fewer canaries or larger sets"
        )

    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pool, generator=generator)
    train_idx = perm[:n_train]
    holdout_idx = perm[n_train:n_train + n_holdout]
    if test_data is None:
        test_idx = perm[n_train + n_holdout:n_train + n_holdout + n_test]
    else:
        test_idx = torch.randperm(x_test_src.shape[0], generator=generator)[:n_test]

    x_train, y_train = _take(x, y, train_idx)
    x_holdout, y_holdout = _take(x, y, holdout_idx)
    x_test, y_test = _take(x_test_src, y_test_src, test_idx)

    train_idx, holdout_idx = train_idx.clone(), holdout_idx.clone()
    train_mask = torch.zeros(n_train, dtype=torch.bool)
    holdout_mask = torch.zeros(n_holdout, dtype=torch.bool)
    if canaries > 0:
        value_range = _value_range(x)
        for x_part, y_part, idx_part, mask, k in (
            (x_train, y_train, train_idx, train_mask, k_train),
            (x_holdout, y_holdout, holdout_idx, holdout_mask, k_holdout),
        ):
            _plant_canaries(x_part, y_part, idx_part, mask, k, canary_kind=canary_kind,
                            num_classes=num_classes, value_range=value_range,
                            generator=generator)

    return MembershipSplit(
        name=name,
        train=TensorDataset(x_train, y_train),
        holdout=TensorDataset(x_holdout, y_holdout),
        test=TensorDataset(x_test, y_test),
        train_indices=train_idx,
        holdout_indices=holdout_idx,
        test_indices=test_idx.clone(),
        train_canary_mask=train_mask,
        holdout_canary_mask=holdout_mask,
        canary_kind=canary_kind if canaries > 0 else None,
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        seed=seed,
    )


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    canaries: int = 0,
    canary_kind: str = "mislabel",
    n_train: int | None = None,
    n_holdout: int | None = None,
    n_test: int | None = None,
    max_examples: int | None = None,
    verify_checksums: bool = True,
) -> MembershipSplit:
    """Load a dataset by name and split it into members, holdout and test.

    ``"digits"`` is scikit-learn's embedded copy (1797 images, 8×8, no files): its
    pool is split 40/30/30. The others are read by ``torchvision.datasets`` from
    ``data_dir`` with ``download=False``, in torchvision's layout; their official
    training set is the pool for train and holdout (50/50 by default) and their
    official test set is the test set:

    - ``"mnist"``: ``DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    - ``"fashionmnist"``: the same under ``DIR/FashionMNIST/raw/``
    - ``"cifar10"``: ``DIR/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
      ``test_batch``, ``batches.meta``), as extracted from ``cifar-10-python.tar.gz``.

    Args:
        name: one of :data:`DATASET_NAMES` (case, ``-`` and ``_`` ignored).
        data_dir: the torchvision root folder; required for every name but
            ``"digits"`` (command line: ``--data-dir``).
        seed: seed of the split and the canaries.
        canaries: number of canaries, half planted in train and half in holdout.
        canary_kind: ``"mislabel"`` or ``"ood"``; see :func:`make_split`.
        n_train: number of members (default: a share of the pool, see above).
        n_holdout: number of non-members.
        n_test: number of test examples.
        max_examples: use a random subsample of at most this many rows of the pool
            and of the test set (keeps CPU runs on the large datasets short).
        verify_checksums: CIFAR-10 only. torchvision checks every file's MD5 against
            the official release before unpickling it; False checks only that the files
            exist, for a deliberately modified copy. The files are Python pickles, which
            can run code when loaded: turn the check off only for files you trust.

    Returns:
        A :class:`MembershipSplit` with float32 inputs in ``[0, 1]``.

    Raises:
        ValueError: unknown name, ``data_dir`` missing, a file that cannot be parsed or
            fails its checksum, or sizes that do not fit.
        FileNotFoundError: ``data_dir`` or a file torchvision needs is not there.

    Example:
        >>> split = load_dataset("digits", seed=1, canaries=10)
        >>> split.input_shape, split.num_classes, split.num_canaries
        ((1, 8, 8), 10, 10)
    """
    key = _normalise_name(name)
    split_kwargs: dict[str, Any] = dict(
        n_train=n_train, n_holdout=n_holdout, n_test=n_test, seed=seed,
        canaries=canaries, canary_kind=canary_kind, max_examples=max_examples, name=key,
    )
    if key == "digits":
        x, y = load_digits_tensors()
        return make_split(x, y, num_classes=10, **split_kwargs)

    root = _require_data_dir(key, data_dir)
    if key in ("mnist", "fashionmnist"):
        x_pool, y_pool, x_test, y_test = _load_mnist_like(key, root)
    else:
        x_pool, y_pool, x_test, y_test = _load_cifar10(root, verify_checksums=verify_checksums)
    return make_split(x_pool, y_pool, num_classes=10, test_data=(x_test, y_test),
                      **split_kwargs)


# --------------------------------------------------------------------------- helpers


def _check_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _check_xy(x: Any, y: Any, x_name: str, y_name: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{x_name} and {y_name} must be torch tensors, got "
                        f"{type(x).__name__} and {type(y).__name__}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"{x_name} must be a floating point tensor (or uint8 images), got "
                        f"{x.dtype}: convert it with .float()")
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape [N, ...] with one row per example, got "
                         f"shape {tuple(x.shape)}: add a feature dimension with .unsqueeze(1)")
    if y.dim() != 1 or y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{y_name} must be a 1-D integer tensor of class labels, got dtype "
                        f"{y.dtype} and shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} has {x.shape[0]} rows but {y_name} has {y.shape[0]} labels:"
                         " they must match one to one")


def _resolve_num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    present = [t for t in labels if t.numel() > 0]
    lowest = min((int(t.min()) for t in present), default=0)
    highest = max((int(t.max()) for t in present), default=-1)
    if lowest < 0:
        raise ValueError(f"labels must be class indices >= 0, found {lowest}")
    if num_classes is None:
        return max(highest + 1, 1)
    num_classes = _check_int(num_classes, "num_classes", minimum=1)
    if highest >= num_classes:
        raise ValueError(f"found label {highest} but num_classes={num_classes}: labels must be "
                         "in [0, num_classes); pass a larger num_classes")
    return num_classes


def _resolve_sizes(
    given: Sequence[int | None],
    names: Sequence[str],
    fractions: Sequence[float],
    pool_cap: int,
    n_pool: int,
    max_examples: int | None,
) -> list[int]:
    sizes = [None if g is None else _check_int(g, n, minimum=0)
             for g, n in zip(given, names, strict=True)]
    claimed = sum(s for s in sizes if s is not None)
    if claimed > pool_cap:
        asked = ", ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True) if s is not None)
        raise ValueError(
            f"{asked} need {claimed} rows but the pool has {pool_cap} usable "
            f"({n_pool} in total, max_examples={max_examples}): ask for fewer"
        )
    free = pool_cap - claimed
    open_slots = [i for i, s in enumerate(sizes) if s is None]
    total_share = sum(fractions[i] for i in open_slots)
    handed_out = 0
    for position, i in enumerate(open_slots):
        if position == len(open_slots) - 1:
            share = free - handed_out  # the last open slot takes the rounding remainder
        else:
            share = min(round(free * fractions[i] / total_share), free - handed_out)
        sizes[i] = share
        handed_out += share
    return [int(s) for s in sizes]  # type: ignore[arg-type]


def _take(x: torch.Tensor, y: torch.Tensor,
          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Advanced indexing copies, so planting canaries never edits the caller's tensors.
    x_rows = x[rows.to(x.device)]
    if x_rows.dtype == torch.uint8:
        x_rows = x_rows.to(torch.float32).div_(255.0)
    return x_rows.contiguous(), y[rows.to(y.device)].to(torch.long)


def _value_range(x: torch.Tensor) -> tuple[float, float]:
    if x.dtype == torch.uint8:
        return 0.0, 1.0
    if x.numel() == 0:
        return 0.0, 1.0
    lo, hi = float(x.min()), float(x.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _plant_canaries(
    x_part: torch.Tensor,
    y_part: torch.Tensor,
    idx_part: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    *,
    canary_kind: str,
    num_classes: int,
    value_range: tuple[float, float],
    generator: torch.Generator,
) -> None:
    if k == 0:
        return
    positions = torch.randperm(mask.shape[0], generator=generator)[:k]
    mask[positions] = True
    on_x = positions.to(x_part.device)
    on_y = positions.to(y_part.device)
    if canary_kind == "mislabel":
        # Adding 1..C-1 modulo C moves every label to a uniformly drawn *other* class.
        shift = torch.randint(1, num_classes, (k,), generator=generator)
        y_part[on_y] = (y_part[on_y] + shift.to(y_part.device)) % num_classes
    else:
        lo, hi = value_range
        noise = torch.rand((k, *x_part.shape[1:]), generator=generator) * (hi - lo) + lo
        x_part[on_x] = noise.to(device=x_part.device, dtype=x_part.dtype)
        labels = torch.randint(0, num_classes, (k,), generator=generator)
        y_part[on_y] = labels.to(y_part.device)
        idx_part[positions] = -1


def _normalise_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, one of {DATASET_NAMES}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    return key


def _require_data_dir(key: str, data_dir: str | os.PathLike[str] | None) -> str:
    if data_dir is None:
        raise ValueError(
            f"dataset {key!r} is read from files on disk: pass data_dir=DIR (on the command "
            f"line: --data-dir DIR) pointing at the torchvision root that holds "
            f"{_expected_layout(key, 'DIR')}. gradguard never downloads data; the "
            f"'digits' dataset needs no files."
        )
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data_dir {root!r} (--data-dir) is not a directory: it should be the "
            f"torchvision root that holds {_expected_layout(key, root)}"
        )
    return root


def _expected_layout(key: str, root: str) -> str:
    if key == "cifar10":
        return os.path.join(root, _CIFAR10_FOLDER, "") + " (" + ", ".join(_CIFAR10_FILES) + ")"
    folder = os.path.join(root, _torchvision_mnist_class(key).__name__, "raw")
    return os.path.join(folder, "") + " (" + ", ".join(_MNIST_RAW_FILES) + ")"


def _never_downloads(key: str) -> str:
    cls = "CIFAR10" if key == "cifar10" else _torchvision_mnist_class(key).__name__
    return (
        "gradguard never downloads data: fetch the files yourself (for example with "
        f"torchvision.datasets.{cls}(root=DIR, download=True) on a machine with internet "
        "access) and copy them there"
    )


def _torchvision_mnist_class(key: str) -> type:
    from torchvision import datasets

    return datasets.MNIST if key == "mnist" else datasets.FashionMNIST


def _load_mnist_like(
    key: str, root: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cls = _torchvision_mnist_class(key)
    folder = os.path.join(root, cls.__name__)
    raw = os.path.join(folder, "raw")
    # torchvision also accepts its old processed/{training,test}.pt cache.
    legacy = all(os.path.isfile(os.path.join(folder, "processed", f))
                 for f in ("training.pt", "test.pt"))
    missing = [f for f in _MNIST_RAW_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing and not legacy:
        gzipped = [f for f in missing if os.path.isfile(os.path.join(raw, f + ".gz"))]
        if gzipped:
            raise FileNotFoundError(
                f"{key}: found {', '.join(f + '.gz' for f in gzipped)} in {raw} but "
                "torchvision (download=False) reads the uncompressed files: run "
                f"`gunzip -k {os.path.join(raw, '*.gz')}`"
            )
        raise FileNotFoundError(
            f"{key}: missing {', '.join(os.path.join(raw, f) for f in missing)}. torchvision "
            f"expects {_expected_layout(key, root)}. {_never_downloads(key)}."
        )
    parts = []
    for train in (True, False):
        try:
            dataset = cls(root=root, train=train, download=False)
        except (AssertionError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(
                f"{key}: torchvision could not read the {'train' if train else 't10k'} files "
                f"in {raw} ({type(err).__name__}: {err}); they must be uncompressed "
                "idx-ubyte files (images: magic 2051, uint8 [N, H, W]; labels: magic 2049, "
                "uint8 [N])"
            ) from err
        images, labels = dataset.data, dataset.targets
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{key}: {'train' if train else 't10k'} files hold images of shape "
                f"{tuple(images.shape)} and labels of shape {tuple(labels.shape)}; expected "
                "[N, H, W] images and N labels"
            )
        # Stay uint8 here: make_split scales only the rows it keeps.
        parts += [images.unsqueeze(1), labels.to(torch.long)]
    return parts[0], parts[1], parts[2], parts[3]


def _load_cifar10(
    root: str, *, verify_checksums: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = os.path.join(root, _CIFAR10_FOLDER)
    missing = [f for f in _CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        archive = os.path.join(root, CIFAR10.filename)
        if os.path.isfile(archive):
            raise FileNotFoundError(
                f"cifar10: found {archive} but not its extracted files; run "
                f"`tar -xzf {archive} -C {root}`"
            )
        raise FileNotFoundError(
            f"cifar10: missing {', '.join(os.path.join(folder, f) for f in missing)}. "
            f"torchvision expects {_expected_layout('cifar10', root)}. "
            f"{_never_downloads('cifar10')}."
        )
    cls = _cifar10_class(verify_checksums)
    parts = []
    for train in (True, False):
        try:
            dataset = cls(root=root, train=train, download=False)
        except RuntimeError as err:
            expected = [*CIFAR10.train_list, *CIFAR10.test_list,
                        [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
            bad = [name for name, md5 in expected
                   if not check_integrity(os.path.join(folder, name), md5)]
            if not verify_checksums or not bad:
                raise
            raise ValueError(
                f"cifar10: {', '.join(bad)} in {folder} do not match the MD5 checksums "
                "torchvision expects for the official CIFAR-10 release. Re-extract "
                "cifar-10-python.tar.gz, or, for a copy you modified on purpose and trust, "
                "pass verify_checksums=False (the files are pickles, which can run code)."
            ) from err
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise ValueError(
                f"cifar10: torchvision could not unpickle the files in {folder} "
                f"({type(err).__name__}: {err}); they must be the python-version batches"
            ) from err
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # HWC -> CHW, uint8
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"cifar10: {images.shape[0]} images but {labels.shape[0]} labels")
        parts += [images.contiguous(), labels]
    return parts[0], parts[1], parts[2], parts[3]


@functools.cache
def _cifar10_class(verify_checksums: bool) -> type:
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class CIFAR10WithoutChecksums(CIFAR10):
        """torchvision's CIFAR10, checking only that the files exist.

        torchvision's ``check_integrity(path, md5)`` skips the MD5 comparison when
        ``md5`` is None, so clearing the expected checksums is all it takes; reading and
        layout stay torchvision's own.
        """

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10WithoutChecksums
