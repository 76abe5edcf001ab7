"""Static int8 quantization of a version's model.onnx, for faster CPU serving.

    convnet export --model ROOT --quantize int8 --data PATH   # model.int8.onnx beside model.onnx

ONNX Runtime's `quantize_static` in QDQ format: the Conv and MatMul weights become int8 (one scale
per output channel), their inputs and outputs are quantized with ranges calibrated on a few hundred
training images, and ONNX Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into one
integer convolution. The first convolution (the whitening stem, fed raw normalised pixels), the
classifier head and everything after it (temperature Div, Softmax, the `logits` output) stay float:
both layers are a small share of the work, and with them float the int8 model gave the float
model's answer most often. bench/quantize.py measured the alternatives (bench/results/quantize.md);
quantizing every op ONNX Runtime can, GELU's arithmetic included, cost 1.3 points of accuracy.

The int8 file keeps the float graph's contract: uint8 pixels (N, S, S, 3) in, `probabilities`
first out, `logits` too when the version is calibrated, so the server's unsure rule still works.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from convnet import modeldir

CALIBRATION_IMAGES = 512  # training images that set the activation ranges
CALIBRATION_BATCH = 64  # images per calibration run, at most
QUANTIZED_OPS = ("Conv", "MatMul")  # the rest (GELU's Mul/Add/Tanh, pooling, BN) stays float


class QuantizeError(ValueError):
    """A quantization request that cannot run, or a result that breaks the model's contract."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize; the defaults are what bench/quantize.py chose for the bundled model."""

    method: str = "percentile"  # activation ranges: "minmax", "entropy" or "percentile"
    percentile: float = 99.999  # % of calibration values inside the range ("percentile" only)
    symmetric_activations: bool = False  # int8 activations centred on 0, else uint8 asymmetric
    per_channel: bool = True  # one weight scale per output channel, else one per tensor
    keep_stem: bool = True  # the first Conv stays float
    keep_head: bool = True  # the last MatMul/Gemm (the classifier) stays float
    preprocess: bool = True  # onnxruntime's quant_pre_process: shape inference, fusions
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI that overflow otherwise
    all_ops: bool = False  # also GELU's Mul/Add, pooling, Softmax...: ORT's default op list

    def describe(self) -> str:
        parts = [self.method + (f" {self.percentile:g}" if self.method == "percentile" else ""),
                 "int8 sym act" if self.symmetric_activations else "uint8 act",
                 "per-channel" if self.per_channel else "per-tensor"]
        kept = [name for name, kept in (("stem", self.keep_stem), ("head", self.keep_head)) if kept]
        parts.append(f"float {'+'.join(kept)}" if kept else "no layer kept float")
        parts.append("every op ORT can quantize" if self.all_ops else "Conv+MatMul only")
        parts += [name for name, on in (("pre-process", self.preprocess),
                                        ("reduce-range", self.reduce_range)) if on]
        return ", ".join(parts)


def calibration_sample(labels: np.ndarray, count: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> np.ndarray:
    """Indices of `count` images spread evenly over the classes in `labels`."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = -(-count // len(classes))
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(rng.permutation(np.concatenate(chosen))[:count])


def _float_nodes(model, config: QuantConfig) -> list[str]:
    """Names of the Conv/MatMul nodes `config` keeps in float."""
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    keep = []
    if config.keep_stem and compute and compute[0].op_type == "Conv":
        keep.append(compute[0].name)
    if config.keep_head and compute and compute[-1].op_type in ("MatMul", "Gemm"):
        keep.append(compute[-1].name)
    return keep


def _name_nodes(model) -> None:
    """Give unnamed nodes a name, so nodes_to_exclude can point at them."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def quantize_model(float_bytes: bytes, images: np.ndarray,
                   config: QuantConfig = QuantConfig()) -> bytes:
    """The int8 QDQ version of a float ONNX model (uint8 pixels -> probabilities), its
    activation ranges calibrated on `images` (N, S, S, 3) uint8."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if config.method not in methods:
        raise QuantizeError(f"unknown calibration method {config.method!r}: {', '.join(methods)}")
    if len(images) == 0:
        raise QuantizeError("no calibration images")
    model = onnx.load_from_string(float_bytes)
    _name_nodes(model)
    input_name = model.graph.input[0].name
    # Equal batches: the histogram calibrators stack each batch's outputs into one array.
    batch = max(d for d in range(1, min(CALIBRATION_BATCH, len(images)) + 1)
                if len(images) % d == 0)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._starts = iter(range(0, len(images), batch))

        def get_next(self):
            start = next(self._starts, None)
            if start is None:
                return None
            return {input_name: images[start : start + batch]}

    extra: dict[str, object] = {"ActivationSymmetric": config.symmetric_activations,
                                "WeightSymmetric": True}
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    with tempfile.TemporaryDirectory(prefix="convnet-int8-") as tmp:
        source, staged, out = (Path(tmp) / name for name in ("float.onnx", "pre.onnx",
                                                                "int8.onnx"))
        onnx.save(model, str(source))
        if config.preprocess:
            quant_pre_process(str(source), str(staged), skip_symbolic_shape=True)
        else:
            staged = source
        # The calibrator's augmented copy of the graph goes to the working directory unless
        # told otherwise: keep it in tmp.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(
                str(staged), str(out), Batches(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=None if config.all_ops else list(QUANTIZED_OPS),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=QuantType.QInt8 if config.symmetric_activations
                else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=_float_nodes(model, config),
                calibrate_method=methods[config.method], extra_options=extra)
        finally:
            os.chdir(cwd)
        quantized = onnx.load(str(out))
    _check_contract(model, quantized)
    return quantized.SerializeToString()


def _check_contract(float_model, quantized) -> None:
    """The int8 graph must take and give what the float one does, temperature included."""
    from convnet.calibrate import TEMPERATURE_NODE

    def outputs(m):
        return [o.name for o in m.graph.output]

    if outputs(float_model) != outputs(quantized) or \
            float_model.graph.input[0].name != quantized.graph.input[0].name:
        raise QuantizeError(f"quantization changed the graph's inputs or outputs: "
                            f"{outputs(float_model)} -> {outputs(quantized)}")
    had = any(i.name == TEMPERATURE_NODE for i in float_model.graph.initializer)
    has = any(i.name == TEMPERATURE_NODE for i in quantized.graph.initializer)
    if had and not has:
        raise QuantizeError("quantization lost the calibrated temperature")


def add_int8(version_dir: str | os.PathLike, images: np.ndarray,
             config: QuantConfig = QuantConfig(), *, source: str = "",
             facts: dict | None = None) -> Path:
    """Write `version_dir`/model.int8.onnx from its model.onnx, calibrated on `images` (training
    images, (N, S, S, 3) uint8), and record how in metrics.json's "int8", with `facts` (e.g. a
    measured accuracy)."""
    version_dir = Path(version_dir)
    float_path = version_dir / modeldir.ONNX_FILE
    if not float_path.is_file():
        raise QuantizeError(f"{version_dir} has no {modeldir.ONNX_FILE} to quantize")
    quantized = quantize_model(float_path.read_bytes(), images, config)
    target = version_dir / modeldir.INT8_FILE
    modeldir.write_bytes_atomic(target, quantized)
    metrics = modeldir.load_metrics(version_dir)
    metrics["int8"] = {"file": modeldir.INT8_FILE, "calibration_images": len(images),
                       "calibration_data": source, "config": asdict(config),
                       "bytes": len(quantized), **(facts or {})}
    modeldir.write_json_atomic(version_dir / modeldir.METRICS_FILE, metrics)
    return target
