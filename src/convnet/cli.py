"""`convnet` command line: each command parses its options and calls one library function.

Heavy imports (TensorFlow, Keras) happen inside the commands that need them, so `convnet serve`,
`evaluate` and `predict` start fast and run without the `train` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from convnet.modeldir import PRECISIONS

MODEL_HELP = ("Model root (highest version used), one version folder, or a bundled model's name "
              "(cifar10, flowers). Default: the bundled CIFAR-10 model.")


class CliError(click.ClickException):
    exit_code = 2


def _fail_clearly(fn):
    """Turn our own input errors (ValueErrors defined in convnet: DataError, ImageError,
    ModelDirError, TrainError) into one-line messages; anything else keeps its traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            if not type(exc).__module__.startswith("convnet."):
                raise
            raise CliError(str(exc)) from None

    return wrapper


@click.group()
@click.version_option(package_name="convnet")
@click.option("-v", "--verbose", is_flag=True,
              help="Log debug messages, and let TensorFlow print its start-up and runtime notices.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Train a convolutional image classifier and serve it over HTTP."""
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("convnet").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
        # Read by TensorFlow's C++ logging when it loads, so set before any command imports it:
        # 2 keeps errors, drops INFO and WARNING (oneDNN, CPU features, grappler sessions).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _fd2_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Keras backends that can train (numpy and openvino only infer)
TRAINING_BACKENDS = ("tensorflow", "jax", "torch")


def _import_keras() -> None:
    """Import Keras and its backend now. TensorFlow's native code prints a few notices while it
    loads (oneDNN, absl's "before InitializeLog") straight to file descriptor 2, some whatever
    TF_CPP_MIN_LOG_LEVEL says; unless -v they go to /dev/null for the length of the import. A
    failed import still raises, with its traceback, once stderr is back."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if "keras" not in sys.modules and backend not in TRAINING_BACKENDS:
        raise CliError(f"KERAS_BACKEND={backend} is not a backend convnet supports: choose "
                       f"{', '.join(TRAINING_BACKENDS)} (tensorflow when unset)")
    ctx = click.get_current_context(silent=True)
    verbose = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("verbose"))
    if verbose or "keras" in sys.modules:
        import keras  # noqa: F401
        return
    with _fd2_to_devnull():
        import keras  # noqa: F401


@main.command()
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              show_default=True, help="Folder to download into.")
@click.option("--url", default=None, help="Mirror URL of cifar-10-python.tar.gz.")
@click.option("--md5", default=None, help="Expected MD5. Default: the official archive's.")
@_fail_clearly
def download(dest: Path, url: str | None, md5: str | None) -> None:
    """Fetch the official CIFAR-10 python tarball, MD5-verified, resuming if interrupted."""
    from convnet import download as dl

    options = {k: v for k, v in (("url", url), ("md5", md5)) if v}
    try:
        path = dl.download_cifar10(dest, **options)
    except dl.DownloadError as exc:
        raise CliError(str(exc)) from None
    click.echo(path)


def _size_epochs(ctx, param, value: str | None) -> tuple[int, int] | None:
    """SIZE:EPOCHS -> (SIZE, EPOCHS), two positive integers, or "off" -> PROGRESSIVE_OFF; what
    they must be beside the data and the run's epochs is train()'s to check
    (train.config.check_progressive)."""
    from convnet.sizing import PROGRESSIVE_OFF  # not train.config: that loads Keras

    if value is None:
        return None
    if value == "off":
        return PROGRESSIVE_OFF
    size, colon, epochs = value.partition(":")
    if colon and size.strip().isdigit() and epochs.strip().isdigit():
        parsed = int(size), int(epochs)
        if min(parsed) > 0:
            return parsed
    raise click.BadParameter(f"{value!r} is not SIZE:EPOCHS, two positive integers (e.g. 24:4), "
                             "or off")


@main.command()
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="Dataset: CIFAR-10 batches (folder or tarball), image folder or archive.")
@click.option("--test-data", type=click.Path(exists=True), default=None,
              help="Test set, if not inside --data.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/cifar10",
              show_default=True, help="Model root; the run writes version max+1.")
@click.option("--preset", type=click.Choice(["fast", "quick", "tutorial"]), default="fast",
              show_default=True)
@click.option("--image-size", type=click.IntRange(16, 256), default=None,
              help="Input side in pixels; images are decoded to it (centre square). Default: "
                   "32 for CIFAR-style 32x32 data, 96 for photos (their own size if smaller).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=None,
              help="Default: the preset's (8 on model.fit, quick with SGD 6; 12 on the device "
                   "loop), more for a small data "
                   "set: enough to see 96,000 images. Fractions (e.g. 8.5) end part-way through "
                   "the last epoch.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Default: with Muon fast 2000 and quick 1000; with SGD 1024 (quick 512 on "
                   "model.fit); halved for a small data set until an epoch has 32 steps (20 "
                   "with Muon; not below 64).")
@click.option("--lr", type=float, default=None,
              help="SGD's peak learning rate, per 1024 examples (airbench units).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Fraction of train held out for validation.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1), default=0.2, show_default=True)
@click.option("--translate", type=click.IntRange(0, 32), default=None,
              help="Random translation, pixels. Default: a 16th of the image size (2 at 32 px).")
@click.option("--no-flip", is_flag=True, help="Disable random horizontal flips.")
@click.option("--augment", type=click.Choice(["auto", "airbench", "photo"]), default="auto",
              show_default=True,
              help="airbench: flips and shifts a whole epoch at a time (for thumbnails); photo: "
                   "flips, shifts, CutMix and optional resized crops, a batch at a time; auto: "
                   "photo for photos.")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True,
              help="photo: random resized crops of this share of the area up to all of it "
                   "(e.g. 0.25); 1: none.")
@click.option("--cutmix", type=click.FloatRange(0, 1), default=None,
              help="photo: share of batches mixed by CutMix.  [default: 0.5]")
@click.option("--outliers", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Outlier exposure: add this fraction of a batch of synthetic images of none "
                   "of the classes (shuffled tiles, rotations, recoloured, zoomed, noise) to "
                   "every batch, with a flat target, so that 'not sure' flags unfamiliar images "
                   "more often (e.g. 0.125). Fit loop only.")
@click.option("--class-weight", type=click.Choice(["auto", "none"]), default="auto",
              show_default=True,
              help="auto: weight the loss by inverse class frequency when the largest class "
                   "has at least twice the images of the smallest.")
@click.option("--tta/--no-tta", default=True, show_default=True,
              help="Test-time augmentation when scoring the exported model.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Write TensorBoard logs (scalars and graph) here.")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop at the last epoch that fits in this many seconds of training.")
@click.option("--data-parallel", is_flag=True,
              help="Split each batch over all local devices (JAX DataParallel / "
                   "TF MirroredStrategy).")
@click.option("--distributed", is_flag=True,
              help="One process per host (JAX backend): join the cluster named by "
                   "CONVNET_COORDINATOR, CONVNET_NUM_PROCESSES and CONVNET_PROCESS_ID and split "
                   "each batch over every host's devices; process 0 publishes.")
@click.option("--loop", type=click.Choice(["auto", "fit", "device"]), default="auto",
              show_default=True,
              help="device: the whole run compiled on the device (JAX backend; the fast path "
                   "on GPUs); fit: Keras model.fit; auto: device where it can run.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]),
              default="auto", show_default=True,
              help="bfloat16: mixed precision. auto: bfloat16 for the device loop on an "
                   "accelerator and for model.fit on a CPU with bfloat16 instructions, else "
                   "float32.")
@click.option("--optimizer", type=click.Choice(["auto", "sgd", "muon"]), default="auto",
              show_default=True,
              help="sgd: airbench94's Nesterov SGD with lookahead; muon: airbench94_muon's "
                   "(Muon for conv kernels, SGD for the rest; model.fit only); auto: muon for "
                   "fast and quick on model.fit with thumbnails and at least 20,000 images, "
                   "else sgd.")
@click.option("--progressive", metavar="SIZE:EPOCHS|off", default=None, callback=_size_epochs,
              help="Progressive resizing: the first EPOCHS epochs train on images downscaled to "
                   "SIZE x SIZE px (e.g. 24:4), the rest at the full size. fast and quick with "
                   "airbench augmentation, on model.fit with TensorFlow. Default: fast with "
                   "Muon and its own 11 epochs trains the first 5 at 3/4 of the side; off: "
                   "all at the full size.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--dry-run", is_flag=True,
              help="Print the model for --data (its classes, input size), parameters and FLOPs; "
                   "exit.")
@click.option("--no-cache", is_flag=True, help="Decode the dataset again, ignoring the cache.")
@click.option("--extra", type=click.Path(exists=True), default=None,
              help="More training images, e.g. a `convnet feedback export` folder: added to "
                   "--data's train split; its classes must be among --data's.")
@_fail_clearly
def train(data_path, test_data, out, preset, image_size, epochs, batch_size, lr, seed, val_split,
          label_smoothing, translate, no_flip, augment, crop_scale, cutmix, outliers,
          class_weight, tta,
          tensorboard, time_limit, data_parallel, distributed, loop, precision, optimizer,
          progressive, resume, dry_run, no_cache, extra):
    """Train a preset and write OUT/<version>/ (model.keras, model.onnx, labels, metrics).
    Input size, augmentation, batch size and epochs default to what suits the data."""
    from convnet import data, sizing

    # The data first: a bad dataset is reported before TensorFlow spends seconds loading.
    survey = data.survey(data_path, cache=not no_cache)
    size = image_size or sizing.default_image_size(survey)
    augment = sizing.default_augment(survey) if augment == "auto" else augment
    click.echo(f"{data_path}: {survey.num_images} training images in {survey.num_classes} "
               f"classes, median shorter side {survey.short_side} px -> {size}x{size} input, "
               f"{augment} augmentation")
    if dry_run:
        _import_keras()
        from convnet import models

        model = models.build(preset, max(2, survey.num_classes), image_size=size)
        model.summary(print_fn=click.echo)
        click.echo(f"input: {size}x{size} px")
        click.echo(f"parameters: {model.count_params():,}")
        click.echo(f"forward FLOPs per image: {models.count_flops(model):,}")
        return
    splits = data.load_dataset(data_path, size=size, cache=not no_cache)
    if test_data:
        test = data.load_dataset(test_data, size=size, cache=not no_cache)
        splits["test"] = test.get("test") or test.get("train")
    if "train" not in splits:
        raise CliError(f"{data_path} has no training split")
    if extra:
        from convnet.feedback.merge import merge_extra

        before = len(splits["train"])
        splits["train"] = merge_extra(splits, extra, size)
        click.echo(f"{extra}: {len(splits['train']) - before} more training images")
    if splits.get("test") is not None and splits["test"].classes != splits["train"].classes:
        raise CliError("train and test sets have different classes: "
                       f"{splits['train'].classes} vs {splits['test'].classes}")
    _import_keras()
    from convnet import train as training

    if distributed:
        from convnet.train import multihost

        multihost.initialize(multihost.cluster_from_env())
    cfg = training.TrainConfig(
        preset=preset, epochs=epochs, batch_size=batch_size, seed=seed, val_split=val_split,
        label_smoothing=label_smoothing, translate=translate, flip=not no_flip, tta=tta,
        data=str(data_path) + (f" + {extra}" if extra else ""), time_limit=time_limit,
        data_parallel=data_parallel or distributed,
        loop=loop, precision=precision, image_size=size, augment=augment,
        crop_scale=crop_scale, cutmix=cutmix, class_weight=class_weight, outliers=outliers,
        optimizer=optimizer, progressive=progressive,
    )
    if lr is not None:
        cfg.lr = lr
    try:
        version = training.train(cfg, splits["train"], out, test_split=splits.get("test"),
                                 resume=resume, tensorboard=tensorboard)
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. The last finished epoch is saved in {out}/.checkpoint; "
                   f"continue with: convnet train --data {data_path} --out {out} --resume",
                   err=True)
        sys.exit(130)
    if distributed and not multihost.is_writer():
        click.echo(f"process {multihost.process_shard()[0]}: done; process 0 published "
                   f"version {version.name}")
        return
    metrics = json.loads((version / "metrics.json").read_text())
    click.echo(f"wrote {version}")
    if "accuracy" in metrics:
        click.echo(f"test accuracy {metrics['accuracy']:.4f} (tta={metrics['tta']}), "
                   f"trained in {metrics['train_seconds']:.0f} s")


@main.command("export")
@click.option("--model", "model_dir", type=click.Path(), default=None, help=MODEL_HELP)
@click.option("--format", "fmt", type=click.Choice(["onnx", "saved_model"]), default="onnx",
              show_default=True)
@click.option("--out", type=click.Path(), default=None,
              help="A file (onnx) or folder (saved_model) to write, outside any published "
                   "version. Default: publish the export as the model root's next version.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx, statically quantized, calibrated on --data's "
                   "training images (serve it with `convnet serve --precision int8`).")
@click.option("--data", "data_path", type=click.Path(exists=True), default=None,
              help="Dataset whose training images calibrate --quantize.")
@_fail_clearly
def export_cmd(model_dir, fmt, out, quantize, data_path):
    """Export a version's model.keras as ONNX or a TF Serving SavedModel. Without --out the
    export is published as the next version (a copy with the new file); published versions
    are never modified."""
    if quantize and data_path is None:
        raise CliError("--quantize int8 needs --data: training images to calibrate it on")
    _import_keras()
    from convnet.export import export_version

    click.echo(export_version(model_dir, fmt, out, int8_data=data_path if quantize else None))


@main.command("evaluate")
@click.option("--model", "model_dir", type=click.Path(), default=None, help=MODEL_HELP)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True))
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--backend", type=click.Choice(["onnx", "keras"]), default="onnx",
              show_default=True, help="Restore with ONNX Runtime or Keras.")
@click.option("--tta", is_flag=True, help="Average over flipped and shifted views.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--confusion", type=click.Path(dir_okay=False), default="confusion.png",
              show_default=True, help="Confusion-matrix PNG to write.")
@click.option("--out-mistakes", type=click.Path(file_okay=False), default=None,
              help="Also write mistakes.json (the most confidently wrong images, thumbnails "
                   "inside) into this folder; the model page shows it when it is in the "
                   "version folder. Scores the images a second time.")
@_fail_clearly
def evaluate_cmd(model_dir, data_path, split, backend, tta, as_json, confusion, out_mistakes):
    """Restore a model and report accuracy, per-class and top-5 accuracy. The data is decoded
    at the model's input size."""
    from convnet import data
    from convnet import evaluate as ev

    if backend == "keras":
        _import_keras()
    predictor = ev.load_predictor(model_dir, backend)  # first: the data is read at its size
    splits = data.load_dataset(data_path, size=predictor.input_size)
    chosen = splits.get(split) or (splits.get("train") if split == "test" else None)
    if chosen is None:
        raise CliError(f"{data_path} has no {split} split")
    if chosen.classes != predictor.labels:
        raise CliError(f"dataset classes {chosen.classes} differ from the model's "
                       f"{predictor.labels}")
    report = ev.evaluate(predictor, chosen.images, chosen.labels, tta=tta)
    ev.plot_confusion(report["confusion_matrix"], chosen.classes, confusion,
                      title=f"{predictor.version_dir} on {data_path}")
    report["confusion_png"] = str(confusion)
    if out_mistakes:
        from convnet.mistakes import write_mistakes

        probs = predictor.probabilities(chosen.images, tta=tta)
        report["mistakes_json"] = str(write_mistakes(
            out_mistakes, chosen.images, chosen.labels, probs, classes=predictor.labels,
            source=f"{data_path} ({split})", tta=tta))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"model     {report['model']} ({backend}{', tta' if tta else ''})")
    click.echo(f"images    {report['num_images']}")
    click.echo(f"accuracy  {report['accuracy']:.4f}")
    click.echo(f"top-5     {report['top5_accuracy']:.4f}")
    ece = report["ece"]
    click.echo(f"ECE       {ece['before']:.4f}" + ("" if ece["after"] is None else
               f" without the model's temperature, {ece['after']:.4f} with it") +
               f" ({ece['bins']} bins, one view per image)")
    for name, acc in report["per_class_accuracy"].items():
        click.echo(f"  {name:<14} {'-' if acc is None else f'{acc:.4f}'}")
    click.echo(f"confusion matrix: {confusion}")
    if out_mistakes:
        click.echo(f"mistakes: {report['mistakes_json']}")


@main.command("calibrate")
@click.option("--model", "model_dir", type=click.Path(), default=None, help=MODEL_HELP)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="Images the model's weights never saw (e.g. its test set).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--fit-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.5, show_default=True,
              help="Share of each class that fits the temperature and the unsure threshold; the "
                   "rest measures the calibration error.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_root", type=click.Path(file_okay=False), default=None,
              help="Model root to publish into. Default: the model's own root.")
@_fail_clearly
def calibrate_cmd(model_dir, data_path, split, fit_fraction, seed, out_root):
    """Fit a temperature and an unsure rule on held-out images; publish the next version."""
    from convnet import calibrate, data, modeldir
    from convnet.evaluate import load_predictor

    size = load_predictor(model_dir).input_size
    splits = data.load_dataset(data_path, size=size)
    chosen = splits.get(split)
    if chosen is None:
        raise CliError(f"{data_path} has no {split} split")
    vdir = modeldir.resolve_version(model_dir)
    if chosen.classes != modeldir.load_labels(vdir):
        raise CliError(f"dataset classes {chosen.classes} differ from the model's")
    published = calibrate.calibrate_version(vdir, chosen.images, chosen.labels,
                                            fit_fraction=fit_fraction, seed=seed,
                                            source=f"{data_path} ({split})", out_root=out_root)
    click.echo(calibrate.summary(published))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_dir", type=click.Path(), default=None, help=MODEL_HELP)
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_clearly
def predict(files, model_dir, top_k, as_json):
    """Top-k classes and probabilities for local image files."""
    from convnet import evaluate as ev
    from convnet.imaging import ImageError

    predictor = ev.load_predictor(model_dir)
    try:
        results = ev.predict_files(predictor, list(files), top_k)
    except ImageError as exc:
        raise CliError(f"{exc}") from None
    if as_json:
        click.echo(json.dumps({"model": str(predictor.version_dir), "predictions": results}))
        return
    for r in results:
        ranked = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
        click.echo(f"{r['file']}: {ranked}")


@main.command("audit")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="Dataset: CIFAR-10 batches (folder or tarball), image folder or archive.")
@click.option("--model", "model_dir", type=click.Path(exists=True), default=None,
              help="Model root or version folder whose features drive the mislabel check. "
                   "Without one that check is skipped (see --labels).")
@click.option("--labels", "label_features", type=click.Choice(["auto", "pixels", "off"]),
              default="auto", show_default=True,
              help="Mislabel check on: auto, the --model's features (none without it); pixels, "
                   "small pixels and colours (weak on photos); off.")
@click.option("--near-bits", type=click.IntRange(0, 32), default=None,
              help="Perceptual-hash bits (of 64) within which two images are near-duplicates. "
                   "[default: 8]")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object, a key per kind of finding.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write an HTML report here: index.html, thumbnails, findings.json.")
@_fail_clearly
def audit_cmd(data_path, model_dir, label_features, near_bits, as_json, out):
    """Check a dataset: unreadable, tiny, greyscale and odd-sized images, class counts, exact
    and near-duplicates, train/test leakage and likely mislabelled images, each named."""
    try:
        import cleanlab  # noqa: F401
        import imagehash  # noqa: F401
    except ImportError as exc:
        raise CliError(f"convnet audit needs the audit extra ({exc.name} is missing): "
                       "pip install 'convnet[audit]'") from None
    from convnet.audit import AuditConfig, audit, summary_lines

    cfg = AuditConfig(label_features=label_features)
    if near_bits is not None:
        cfg.near_bits = near_bits
    findings, scan = audit(data_path, model_dir, cfg)
    if out:
        from convnet.audit.report import write_report

        findings["report"] = str(write_report(out, findings, scan))
    if as_json:
        click.echo(json.dumps(findings))
        return
    for line in summary_lines(findings):
        click.echo(line)
    if out:
        click.echo(f"report: {findings['report']}")


@main.command()
@click.option("--model", "model_dir", type=click.Path(), default=None, help=MODEL_HELP)
@click.option("--host", default=os.environ.get("HOST", "127.0.0.1"), show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              envvar="CONVNET_WORKERS", help="Gunicorn worker processes ($CONVNET_WORKERS).")
@click.option("--threads", type=click.IntRange(1), default=16, show_default=True,
              envvar="CONVNET_THREADS", help="Threads per worker ($CONVNET_THREADS).")
@click.option("--batch-max-size", type=click.IntRange(1), default=None,
              help="Images per inference call when concurrent requests are batched; 1 = off. "
                   "[default: 64]")
@click.option("--batch-delay-ms", type=click.FloatRange(0), default=None,
              help="Milliseconds a forming batch may wait for requests being decoded. "
                   "[default: 2]")
@click.option("--feedback-db", default=None,
              help="Where feedback is stored: a SQLite file or a postgresql:// URL; '' = off. "
                   "[default: $CONVNET_FEEDBACK_DB or feedback.sqlite3]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="int8: serve model.int8.onnx (from `convnet export --quantize int8`), a "
                   "version without one is refused; float: model.onnx; auto: int8 where a "
                   "version has one. [default: $CONVNET_PRECISION or auto]")
@click.option("--model-config", "model_config", type=click.Path(dir_okay=False), default=None,
              envvar="CONVNET_MODEL_CONFIG",
              help="A YAML file of several models (name, base_path, version_policy, labels) "
                   "to serve instead of --model; re-read when it changes "
                   "($CONVNET_MODEL_CONFIG).")
@_fail_clearly
def serve(model_dir, host, port, workers, threads, batch_max_size, batch_delay_ms, feedback_db,
          precision, model_config):
    """Serve the model over HTTP with gunicorn (web page, REST, TF Serving and V2 APIs)."""
    from convnet.serve.server import run

    config = {} if feedback_db is None else {"FEEDBACK_DB": feedback_db}
    run(model=model_dir, host=host, port=port, workers=workers, threads=threads,
        batch_max_size=batch_max_size, batch_delay_ms=batch_delay_ms, precision=precision,
        config=config, model_config=model_config)


@main.group()
def feedback() -> None:
    """Feedback people gave on predictions (the server's /api/v1/feedback and page forms)."""


@feedback.command("export")
@click.option("--db", required=True,
              help="The server's FEEDBACK_DB: a SQLite file or a postgresql:// URL.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (<class>/<id>.<ext> and manifest.json); an earlier export "
                   "there is replaced.")
@_fail_clearly
def feedback_export(db, out):
    """Write the stored feedback as an image-folder dataset, for `convnet train --extra`."""
    from convnet.feedback.export import export_dataset

    manifest = export_dataset(db, out)
    click.echo(f"wrote {manifest['count']} images in {len(manifest['classes'])} classes to {out}"
               + (f" (skipped {manifest['skipped']})" if manifest["skipped"] else ""))


KEYS_FILE = click.option(
    "--file", "keys_file", required=True, envvar="CONVNET_API_KEYS_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The keys file the server reads. [default: $CONVNET_API_KEYS_FILE]")


@main.group()
def keys() -> None:
    """API keys: a server whose CONVNET_API_KEYS_FILE names a keys file asks every client for
    one (see README, "API keys, rate limits and access logs")."""


@keys.command("create")
@KEYS_FILE
@click.option("--name", default=None, help="Name in logs and `keys list` (letters, digits, ._-). "
              "[default: key-N]")
@click.option("--rate-limit", default=None,
              help="This key's limit, e.g. '100/minute'. [default: the server's RATE_LIMIT]")
@_fail_clearly
def keys_create(keys_file, name, rate_limit):
    """Add a key to the file (created, mode 0600, if missing) and print it, once: only its hash
    is stored. A running server accepts it at once."""
    from convnet.keys import create_key

    key, record = create_key(keys_file, name, rate_limit)
    click.echo(f"created key {record.name!r} in {keys_file}; it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@KEYS_FILE
@_fail_clearly
def keys_list(keys_file):
    """Names, creation times and limits of the keys in the file (never the keys)."""
    from convnet.keys import read_keys

    for record in read_keys(keys_file):
        click.echo(f"{record.name}\t{record.created}\t{record.rate_limit or '-'}")


@keys.command("revoke")
@KEYS_FILE
@click.argument("name")
@_fail_clearly
def keys_revoke(keys_file, name):
    """Remove the key NAME from the file; a running server refuses it from its next request."""
    from convnet.keys import revoke_key

    revoke_key(keys_file, name)
    click.echo(f"revoked key {name!r}")
