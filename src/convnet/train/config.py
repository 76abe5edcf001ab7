"""What a training run is asked to do: TrainConfig and the presets' defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace

from convnet import models, sizing


@dataclass
class TrainConfig:
    preset: str = "fast"
    epochs: float | None = None  # None: default_epochs; a fraction ends inside the last epoch
    batch_size: int | None = None  # None: default_batch_size
    image_size: int | None = None  # input side, pixels; None: the training images' own
    lr: float = 11.5  # per 1024 examples, airbench units (summed loss, coupled weight decay)
    momentum: float = 0.85  # Nesterov
    weight_decay: float = 0.0153  # per 1024 examples, airbench units
    bias_lr_scale: float = 64.0  # BatchNorm biases learn this much faster
    label_smoothing: float = 0.2
    flip: bool = True
    augment: str = "airbench"  # "airbench" (whole epochs) or "photo" (per batch), see Batches
    translate: int | None = None  # pixels of random translation; None: S // 16 (2 at 32 px)
    crop_scale: float = 1.0  # photo: smallest random resized crop, fraction of the area...
    crop_scale_end: float | None = None  # ...growing linearly to this by the last epoch
    cutmix: float | None = None  # photo: share of batches mixed by CutMix; None: PHOTO_CUTMIX
    outliers: float = 0.0  # synthetic outliers added to each batch, a fraction of its size
    class_weight: str = "auto"  # "auto": weight classes by inverse frequency if imbalanced
    warmup: float = 0.23  # fraction of steps to reach the peak learning rate
    lr_start: float = 0.2  # learning rate at the first step, as a fraction of the peak
    lr_end: float = 0.07  # and at the last
    val_split: float = 0.0  # fraction of train held out for per-epoch validation
    seed: int = 0
    tta: bool = True  # evaluate the exported model with flip + shift views
    data: str = ""
    time_limit: float | None = None  # seconds of training; stop early at an epoch boundary
    data_parallel: bool = False  # split each global batch over all local devices
    loop: str = "auto"  # "fit" (model.fit), "device" (JAX, whole run on the device) or "auto"
    precision: str = "auto"  # "float32", "bfloat16" (mixed) or "auto" (train.fit_precision,
    # device_loop.default_precision)
    optimizer: str = "auto"  # "sgd" (airbench94), "muon" (airbench94_muon) or "auto"
    # ("auto": default_optimizer)
    progressive: tuple[int, int] | None = None  # (side in pixels, epochs): the first epochs
    # train on images downscaled to side x side, the rest at image_size; PROGRESSIVE_OFF: all at
    # image_size; None: default_progressive (train() resolves it: a tuple, or None for off)


class TrainError(ValueError):
    """A training request that cannot run, with the reason."""


PRESET_EPOCHS = {"fast": 8, "quick": 6, "tutorial": 20}
# The device loop (JAX on a GPU) is fast enough that 12 epochs still beat airbench94's time
# there (bench/gpu_train.py): more epochs, more accuracy.
DEVICE_EPOCHS = {"fast": 12, "quick": 12}
# Batch sizes for the fit loop on a CPU. quick takes twice the steps per epoch at 512: on 2 cores
# an image costs the same at 512 as at 1024, and in a 6-epoch run the extra steps are worth a point
# of validation accuracy (bench/choose_on_val.py, chosen on data held out of the training set).
# The device loop keeps 1024, the size its GPU figures used.
PRESET_BATCH = {"fast": 1024, "quick": 512, "tutorial": 1024}
DEVICE_BATCH = 1024
# The tutorial net has no BatchNorm; it trains with plain Adam like the original.
TUTORIAL_LR = 1e-3

# airbench94_muon's hyperparameters, in its units (summed loss over a batch; weight decay per
# example); recipe.muon_optimizer converts them for the Keras model.
MUON = {"muon_lr": 0.24, "muon_momentum": 0.6, "bias_lr": 0.053, "head_lr": 0.67,
        "momentum": 0.85, "decay_per_example": 2e-6}

# Muon's defaults on model.fit. airbench94_muon trains fast's net with batches of 2,000 (25
# steps an epoch on CIFAR-10); quick's smaller net did best at 1,000 of 500, 1,000 and 2,000
# (bench/results/cpu_train_quick_muon.md). A batch only halves below MUON_MIN_STEPS steps;
# training sets smaller than MUON_MIN_IMAGES were not measured and keep SGD.
MUON_EPOCHS = {"fast": 11, "quick": 8}
MUON_BATCH = {"fast": 2000, "quick": 1000}
MUON_MIN_STEPS = 20
MUON_MIN_IMAGES = 20_000
# Progressive resizing by default, as (share of the side, share of the epochs): fast with Muon
# trains its first 5 of 11 epochs at 24 px instead of 32 (0.58x the time an epoch): 91.32% (mean
# of 3 seeds) in 18:40 on 2 cores, against 90.68% for 9 epochs all at 32 px in 19:15 (bench/
# results/cpu_train_fast_progressive.md). Only with its own epochs: --epochs N trains all at
# full size.
MUON_PROGRESSIVE = {"fast": (3 / 4, 5 / 11)}
PROGRESSIVE_OFF = sizing.PROGRESSIVE_OFF  # TrainConfig.progressive asked to be off

# Photos: CutMix on half the batches (bench/results/flowers_probes.md)
PHOTO_CUTMIX = 0.5

LOOPS = ("auto", "fit", "device")
OPTIMIZERS = ("auto", "sgd", "muon")
PRECISIONS = ("auto", "float32", "bfloat16")
AUGMENTS = ("airbench", "photo")
CLASS_WEIGHTS = ("auto", "none")


def default_optimizer(preset: str, loop: str, augment: str, num_train: int) -> str:
    """Muon where it was measured to win: model.fit on thumbnails (airbench augmentation), a
    preset in MUON_EPOCHS, a training set large enough for its batches; else SGD (Adam for
    the tutorial network)."""
    if preset == "tutorial":
        return "adam"
    if (loop == "fit" and preset in MUON_EPOCHS and augment == "airbench"
            and num_train >= MUON_MIN_IMAGES):
        return "muon"
    return "sgd"


def default_batch_size(preset: str, loop: str, num_train: int, optimizer: str = "sgd") -> int:
    """The preset's batch for the loop and optimizer, smaller for a small data set
    (sizing.batch_size_for)."""
    if optimizer == "muon":
        return sizing.batch_size_for(num_train, MUON_BATCH[preset], MUON_MIN_STEPS)
    preset_batch = DEVICE_BATCH if loop == "device" else PRESET_BATCH.get(preset, DEVICE_BATCH)
    return sizing.batch_size_for(num_train, preset_batch)


def default_epochs(preset: str, loop: str, num_train: int, optimizer: str = "sgd") -> float:
    """The preset's epochs for the loop and optimizer, more for a small data set
    (sizing.epochs_for)."""
    if optimizer == "muon":
        return sizing.epochs_for(num_train, MUON_EPOCHS[preset])
    return sizing.epochs_for(num_train, (DEVICE_EPOCHS if loop == "device" else
                                         PRESET_EPOCHS)[preset])


def _progressive_blockers(cfg: TrainConfig, loop: str, backend: str) -> list[str]:
    """What in this run rules progressive resizing out, named as the user would say it."""
    return [what for what, wrong in (
        (f"the {cfg.preset} preset", cfg.preset not in models.PRESETS),
        (f"--augment {cfg.augment}", cfg.augment != "airbench"),
        ("the device loop", loop != "fit"),
        (f"the {backend} backend", backend != "tensorflow")) if wrong]


def default_progressive(cfg: TrainConfig, loop: str, backend: str,
                        epochs_given: bool) -> tuple[int, int] | None:
    """(side, epochs) for a resolved cfg whose progressive is None (not asked): MUON_PROGRESSIVE
    where it was measured (its preset with Muon, model.fit on TensorFlow, airbench augmentation)
    and the run keeps the preset's epochs; else None."""
    share = MUON_PROGRESSIVE.get(cfg.preset)
    if (share is None or epochs_given or cfg.optimizer != "muon"
            or _progressive_blockers(cfg, loop, backend)):
        return None
    full = cfg.image_size or 32
    side = max(models.MIN_IMAGE_SIZE, round(full * share[0]))
    epochs = round(float(cfg.epochs or 0) * share[1])
    return (side, epochs) if side < full and 0 < epochs < (cfg.epochs or 0) else None


def check_progressive(cfg: TrainConfig, loop: str, backend: str) -> None:
    """TrainError unless cfg.progressive (side, epochs) can run in this resolved cfg (image_size
    and epochs set): model.fit on TensorFlow (it traces one train step for both sizes), an
    airbench preset with airbench augmentation (the epoch is downscaled after it is augmented),
    a side from models.MIN_IMAGE_SIZE up to below image_size, and fewer epochs than the run."""
    if cfg.progressive is None:
        return
    side, epochs = cfg.progressive
    where = _progressive_blockers(cfg, loop, backend)
    if where:
        raise TrainError("--progressive works with model.fit on TensorFlow, for the fast and "
                         "quick presets with airbench augmentation; not with " + ", ".join(where))
    full = cfg.image_size or 32
    if not models.MIN_IMAGE_SIZE <= side < full:
        raise TrainError(f"--progressive {side}:{epochs}: the side must be at least "
                         f"{models.MIN_IMAGE_SIZE} px and less than the images' {full} px")
    total = cfg.epochs or 0
    if not 0 < epochs < total:
        raise TrainError(f"--progressive {side}:{epochs}: the epochs at {side} px must be more "
                         f"than 0 and fewer than the run's {total:g}")


def with_augmentation(cfg: TrainConfig) -> TrainConfig:
    """cfg with the augmentation's defaults filled in for its image size and policy: translate
    S // 16 pixels, CutMix on PHOTO_CUTMIX of the batches for photos (none for airbench)."""
    translate = (cfg.image_size or 32) // 16 if cfg.translate is None else cfg.translate
    cutmix = cfg.cutmix
    if cfg.augment == "photo":
        cutmix = PHOTO_CUTMIX if cutmix is None else cutmix
        if not 0 < cfg.crop_scale <= 1 or not 0 < (cfg.crop_scale_end or 1) <= 1:
            raise TrainError(f"crop scales must be in (0, 1], got {cfg.crop_scale} and "
                             f"{cfg.crop_scale_end}")
    elif cutmix or cfg.crop_scale != 1 or cfg.crop_scale_end is not None:
        raise TrainError("CutMix and random resized crops are part of --augment photo")
    return replace(cfg, translate=translate, cutmix=cutmix or 0.0)
