"""Exports a trained segmenter for deployment: StableHLO, TensorFlow SavedModel, TFLite, ONNX.

  python -m segjax.export --config=configs/bisenet_gta5_cityscapes.py:gta5=G,cityscapes=C \
      --workdir=runs/bisenet --checkpoint=best --format=onnx --size=512x1024
  python -m segjax.export ... --format=tflite --quantize=int8 --calibration_images=100

The exported function takes RGB images, float32 in 0-255, (N, H, W, 3) at
--size, normalises them with the run's mean and std inside, and returns the
class scores (N, H, W, C) float32 of `config.inference` at that size: logits,
or averaged probabilities under test-time augmentation or with windows that
average their softmax (`inference.average='probs'`; the argmax is the
prediction either way). BatchNorm uses its running statistics, dropout is off.

Formats (the batch dimension is dynamic where the format allows):
  stablehlo   `jax.export`, serialized (model.stablehlo); reloads and runs with
              jax alone, on each of --platforms (default cpu,cuda). Dynamic batch.
  savedmodel  TensorFlow SavedModel through `jax2tf` (saved_model/, signature
              'serving_default': images -> scores). Dynamic batch.
  tflite      model.tflite through TensorFlow Lite's converter, which lowers
              jax2tf's StableHLO; --quantize=float32 (default), float16
              (weights), or int8 (post-training full-integer quantisation,
              float input and output, calibrated on --calibration_images
              images of data.target). Batch fixed at --batch.
  onnx        model.onnx: the float32 TFLite model converted by tf2onnx (the ONNX
              project's converter, opset 17), checked with onnxruntime. Batch
              fixed at --batch. Why this route: jax2tf emits only XlaCallModule
              (StableHLO) ops since its graph mode was removed, which tf2onnx
              cannot read, and jax2onnx requires orbax-checkpoint < 0.11.37,
              older than segjax's.
The TFLite and ONNX batches are fixed because the TFLite lowering of a
dynamic batch adds shape arithmetic whose ONNX conversion onnxruntime rejects.

The artifact is a folder (--output, default
{workdir}/export/<format>[_<quantize>]_<H>x<W>) holding the model file and
`metadata.json`: the input and output names, shapes and meaning, class names,
palette, mean and std, Cityscapes label ids, the checkpoint, and the
verification below. It is built in a hidden folder beside --output and renamed
into place only when complete: a failed or interrupted export leaves no partial
artifact (and an earlier artifact at --output stays until the new one is whole);
the hidden folder of an export killed outright is removed by the next one.

Verification: the artifact is reloaded, as a consumer would, and run on
--verify_images images of data.target (others than the calibration images
where the dataset has enough). Its scores are compared with the JAX model's:
the largest difference relative to the largest score, and the share of pixels
whose argmax agrees. A float32 format differing by more than 1e-4 of the
scores' scale is an error (no artifact is left); a quantised one records its
figures (`python -m segjax.export` prints them).

`segjax.predict --model=ARTIFACT` segments images and videos with an artifact.
"""

import dataclasses
import glob
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh
from PIL import Image

from segjax import cli, data, errors, evaluate, inference, parallel, platforms, reporting, steps

FLAGS = flags.FLAGS
FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx")
QUANTIZATIONS = {"stablehlo": ("float32",), "savedmodel": ("float32",), "onnx": ("float32",),
                 "tflite": ("float32", "float16", "int8")}
METADATA = "metadata.json"
MODEL_FILES = {"stablehlo": "model.stablehlo", "savedmodel": "saved_model",
               "tflite": "model.tflite", "onnx": "model.onnx"}
INPUT_NAME, OUTPUT_NAME = "images", "scores"
FLOAT32_TOLERANCE = 1e-4  # Of the largest score magnitude.
ONNX_OPSET = 17


class ExportError(errors.UserError):
  """An export that cannot be made or does not reproduce the model; the message says which."""


@dataclasses.dataclass(frozen=True)
class Verification:
  images: int
  max_abs_error: float
  relative_error: float  # max |artifact - jax| / max |jax|.
  argmax_agreement: float  # Share of pixels with the same predicted class.

  def describe(self) -> str:
    return (f"on {self.images} images of data.target: scores within {self.max_abs_error:.3g} "
            f"({self.relative_error:.2e} of their scale), argmax agreement "
            f"{100 * self.argmax_agreement:.3f}%")


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
  """'512x1024' -> (512, 1024); ExportError naming `flag` otherwise."""
  match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text or "")
  if not match or min(int(match[1]), int(match[2])) <= 0:
    raise ExportError(f"{flag}={text!r}: expected HEIGHTxWIDTH, e.g. {flag}=512x1024.")
  return int(match[1]), int(match[2])


def scores_fn(config: ml_collections.ConfigDict, seg_state, size: tuple[int, int]) -> Callable:
  """The exported function: float32 RGB images (N, *size, 3) in 0-255 -> scores (N, *size, C)."""
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  tta = inference.Inference.from_config(config.get("inference"))
  variables = {"params": seg_state.params, "batch_stats": seg_state.batch_stats}
  apply_fn = seg_state.apply_fn

  def scores(images: jax.Array) -> jax.Array:
    x = steps.preprocess(images, mean, std)
    return inference.predict(lambda v: apply_fn(variables, v, train=False)["logits"], x, size,
                             tta).astype(jnp.float32)
  return scores


def target_images(config: ml_collections.ConfigDict, count: int,
                  size: tuple[int, int]) -> np.ndarray:
  """`count` images of data.target spread over it, resized (bicubic) to `size`: uint8."""
  source = data.build_source(config.data.target, "data.target")
  picked = [source[i]["image"] for i in data.evenly_spaced(len(source), count)]
  return np.stack([resize_image(image, size) for image in picked])


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic, like the datasets' readers (`segjax.data.files`)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


# ---- Writers: each writes the model file into a folder, or raises ExportError naming the op.


def _write_stablehlo(fn, folder: str, size, batch, quantize, calibration, export_platforms):
  del batch, quantize, calibration
  (n,) = jax.export.symbolic_shape("n")
  spec = jax.ShapeDtypeStruct((n, *size, 3), jnp.float32)
  try:
    exported = jax.export.export(jax.jit(fn), platforms=export_platforms)(spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(_cannot_express("stablehlo", e)) from e
  with open(os.path.join(folder, MODEL_FILES["stablehlo"]), "wb") as f:
    f.write(exported.serialize())


def _tf_function(fn, size, batch: int | None, export_platforms=None):
  """`fn` as a tf.function through jax2tf: images (batch or None, *size, 3) -> scores."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  options = {"with_gradient": False}
  if batch is None:
    options["polymorphic_shapes"] = [f"(n, {size[0]}, {size[1]}, 3)"]
  if export_platforms:
    options["native_serialization_platforms"] = tuple(export_platforms)
  return tf.function(
      lambda images: {OUTPUT_NAME: jax2tf.convert(fn, **options)(images)}, autograph=False,
      input_signature=[tf.TensorSpec([batch, *size, 3], tf.float32, name=INPUT_NAME)])


def _write_savedmodel(fn, folder, size, batch, quantize, calibration, export_platforms):
  del batch, quantize, calibration
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  module = tf.Module()
  module.serve = _tf_function(fn, size, None, export_platforms)
  try:
    signature = module.serve.get_concrete_function()
    tf.saved_model.save(module, os.path.join(folder, MODEL_FILES["savedmodel"]),
                        signatures={"serving_default": signature})
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(_cannot_express("savedmodel", e)) from e


def _tflite_bytes(fn, size, batch: int, quantize: str, calibration: np.ndarray | None,
                  fmt: str = "tflite") -> bytes:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  function = _tf_function(fn, size, batch)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], function)
  if quantize == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "int8":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = lambda: (
        [calibration[i:i + batch].astype(np.float32)]
        for i in range(0, len(calibration) - batch + 1, batch))
  try:
    return converter.convert()
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(_cannot_express(fmt, e)) from e


def _write_tflite(fn, folder, size, batch, quantize, calibration, export_platforms):
  del export_platforms
  with open(os.path.join(folder, MODEL_FILES["tflite"]), "wb") as f:
    f.write(_tflite_bytes(fn, size, batch, quantize, calibration))


def _onnx_package(name: str):
  """The ONNX package `name`, or ExportError saying how to install it."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ExportError(f"ONNX needs the package {name}: pip install -e '.[export]' (tf2onnx, "
                      "onnx, onnxruntime).") from e


def _write_onnx(fn, folder, size, batch, quantize, calibration, export_platforms):
  del quantize, calibration, export_platforms
  onnx, tf2onnx = _onnx_package("onnx"), _onnx_package("tf2onnx")
  tflite_path = os.path.join(folder, "float32.tflite")
  with open(tflite_path, "wb") as f:
    f.write(_tflite_bytes(fn, size, batch, "float32", None, "onnx"))
  try:
    model, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  except Exception as e:  # pylint: disable=broad-except
    raise ExportError(_cannot_express("onnx", e)) from e
  os.remove(tflite_path)
  # tf2onnx logs the operations it cannot convert and leaves them in the graph, unrunnable.
  unknown = sorted({f"{node.domain or 'ai.onnx'}:{node.op_type}" for node in model.graph.node
                    if not onnx.defs.has(node.op_type, node.domain or "")})
  if unknown:
    raise ExportError(f"--format=onnx cannot express the operations {', '.join(unknown)} "
                      f"(tf2onnx {tf2onnx.__version__}, opset {ONNX_OPSET}).")
  onnx.save(model, os.path.join(folder, MODEL_FILES["onnx"]))


WRITERS = {"stablehlo": _write_stablehlo, "savedmodel": _write_savedmodel,
           "tflite": _write_tflite, "onnx": _write_onnx}


def _cannot_express(fmt: str, error: Exception) -> str:
  """The operations named by a converter's error, and the format."""
  text = str(error)
  ops = sorted(set(re.findall(r"failed to legalize operation '([\w.]+)'", text)
                   + re.findall(r"'([\w.]+)' op (?:is|was)", text)))
  what = f"the operations {', '.join(ops)}" if ops else "this model"
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
  detail = next((line for line in lines if "error:" in line), lines[0])
  return f"--format={fmt} cannot express {what}: {detail[:2000]}"


# ---- Loading an artifact: what segjax.predict and the tests run.


class Artifact:
  """An exported model, loaded with its format's runtime: `artifact(images)` -> scores.

  `images` are (N, H, W, 3) at `size`, uint8 or float32 in 0-255; any N (a
  fixed-batch format runs in batches of its size, the last one padded).
  """

  def __init__(self, path: str):
    metadata_path = os.path.join(path, METADATA)
    if not os.path.isfile(metadata_path):
      raise ExportError(f"--model={path} is not an exported model: no {METADATA} in it "
                        "(python -m segjax.export writes one).")
    with open(metadata_path, encoding="utf-8") as f:
      self.metadata = json.load(f)
    self.path = path
    self.format = self.metadata["format"]
    shape = self.metadata["input"]["shape"]
    self.batch, self.size = shape[0], tuple(shape[1:3])
    self.class_names = tuple(self.metadata["class_names"])
    self.palette = np.asarray(self.metadata["palette"], np.uint8)
    self.label_ids = {int(k): int(v) for k, v in self.metadata.get("label_ids", {}).items()}
    self._run = runtime(self.format, os.path.join(path, self.metadata["file"]))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.shape[1:] != (*self.size, 3):
      raise ExportError(f"{self.path} takes images of {self.size[0]}x{self.size[1]}x3; got "
                        f"{images.shape[1:]}.")
    if self.batch is None:
      return np.asarray(self._run(images))
    parts = []
    for start in range(0, len(images), self.batch):
      chunk = images[start:start + self.batch]
      padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]),
                                               np.float32)])
      parts.append(np.asarray(self._run(padded))[:len(chunk)])
    return np.concatenate(parts)


def runtime(fmt: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
  """The model file `path` of `fmt` loaded by its runtime: float32 images -> scores."""
  return {"stablehlo": _load_stablehlo, "savedmodel": _load_savedmodel,
          "tflite": _load_tflite, "onnx": _load_onnx}[fmt](path)


def _load_stablehlo(path: str):
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return jax.jit(exported.call)


def _load_savedmodel(path: str):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  serve = tf.saved_model.load(path).signatures["serving_default"]
  return lambda x: serve(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy()


def _load_tflite(path: str):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():  # tf.lite.Interpreter's notice of its move to LiteRT.
    warnings.simplefilter("ignore", UserWarning)
    interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
  interpreter.allocate_tensors()
  (image_input,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()

  def run(x):
    interpreter.set_tensor(image_input["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(output["index"]).copy()
  return run


def _load_onnx(path: str):
  session = _onnx_package("onnxruntime").InferenceSession(path,
                                                          providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda x: session.run(None, {name: x})[0]


def verify(artifact: Artifact, fn: Callable, images: np.ndarray) -> Verification:
  """The artifact's scores on `images` against the JAX function's."""
  want = np.asarray(jax.jit(fn)(images.astype(np.float32)))
  got = artifact(images)
  if got.shape != want.shape:
    raise ExportError(f"The {artifact.format} artifact returned scores of shape {got.shape}; "
                      f"the model's are {want.shape}.")
  error = float(np.max(np.abs(got - want)))
  return Verification(images=len(images), max_abs_error=error,
                      relative_error=error / max(float(np.max(np.abs(want))), 1e-12),
                      argmax_agreement=float(np.mean(got.argmax(-1) == want.argmax(-1))))


# ---- The command.


def default_output(workdir: str, fmt: str, quantize: str, size: tuple[int, int]) -> str:
  suffix = "" if quantize == "float32" else f"_{quantize}"
  return os.path.join(workdir, "export", f"{fmt}{suffix}_{size[0]}x{size[1]}")


def export(config: ml_collections.ConfigDict, workdir: str, fmt: str, size: tuple[int, int], *,
           checkpoint: str = "latest", state: str = "seg", batch: int = 1,
           quantize: str = "float32", calibration_images: int = 100, verify_images: int = 4,
           output: str | None = None,
           export_platforms: tuple[str, ...] = ("cpu", "cuda")) -> tuple[str, Verification]:
  """Writes the artifact of `fmt` and returns its folder and verification; ExportError or
  ConfigError, with no artifact written, on anything that cannot work."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}.")
  if quantize not in QUANTIZATIONS[fmt]:
    raise ExportError(f"--quantize={quantize!r} with --format={fmt}: expected one of "
                      f"{', '.join(QUANTIZATIONS[fmt])}.")
  if batch < 1 or verify_images < 1 or (quantize == "int8" and calibration_images < batch):
    raise ExportError(f"--batch={batch}, --verify_images={verify_images} and (int8) "
                      f"--calibration_images={calibration_images} must be positive, the "
                      "calibration images at least one batch.")
  evaluate.check_model(config)
  evaluate.check_label_space(config)
  info = data.dataset_info(config.data.eval, "data.eval")
  mesh = Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
  seg_state, step = evaluate.restore_segmenter(config, workdir, checkpoint, mesh, state)
  seg_state = jax.device_get(seg_state)

  calibrating = calibration_images if quantize == "int8" else 0
  images = target_images(config, calibrating + verify_images, size)
  # Verification images alternate with calibration ones where the dataset has enough.
  verify_at = sorted(set(np.linspace(0, len(images) - 1, verify_images).round().astype(int)))
  calibration = np.delete(images, verify_at, axis=0) if calibrating else None
  if calibrating and len(calibration) < batch:
    calibration = images
  output = output or default_output(workdir, fmt, quantize, size)
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  partial_prefix = f".{os.path.basename(output)}.partial-"
  for stale in glob.glob(os.path.join(parent, glob.escape(partial_prefix) + "*")):
    # Left by an export that was killed (SIGKILL, out of memory); never a finished artifact.
    logging.warning("Removing %s, left by an interrupted export.", stale)
    shutil.rmtree(stale, ignore_errors=True)
  folder = tempfile.mkdtemp(prefix=partial_prefix, dir=parent)
  os.chmod(folder, 0o755)  # mkdtemp makes it private; the artifact is for others to read.
  try:
    with platforms.compiling_for(platforms.EXPORT):  # Lax's operations; resizes as gathers.
      WRITERS[fmt](scores_fn(config, seg_state, size), folder, size, batch, quantize,
                   calibration, tuple(export_platforms))
    metadata = _metadata(config, info, fmt, quantize, size,
                         None if fmt in ("stablehlo", "savedmodel") else batch,
                         workdir, step, checkpoint, state, tuple(export_platforms), calibrating)
    _write_json(os.path.join(folder, METADATA), metadata)
    # Against the model as segjax.predict runs it on this machine.
    checked = verify(Artifact(folder), scores_fn(config, seg_state, size), images[verify_at])
    logging.info("Exported %s: %s", fmt, checked.describe())
    if quantize == "float32" and not checked.relative_error <= FLOAT32_TOLERANCE:
      raise ExportError(
          f"The {fmt} artifact does not reproduce the model: its scores differ by "
          f"{checked.max_abs_error:.3g}, {checked.relative_error:.2e} of their scale (at most "
          f"{FLOAT32_TOLERANCE:g} expected for float32); nothing was written.")
    metadata["verification"] = dataclasses.asdict(checked)
    _write_json(os.path.join(folder, METADATA), metadata)
    _replace(folder, output)
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise
  return output, checked


def _metadata(config, info, fmt, quantize, size, batch, workdir, step, checkpoint, state,
              export_platforms, calibration_images) -> dict:
  return {
      "format": fmt,
      "file": MODEL_FILES[fmt],
      "quantization": quantize,
      "calibration_images": calibration_images,
      "platforms": list(export_platforms) if fmt in ("stablehlo", "savedmodel") else None,
      "input": {"name": INPUT_NAME, "shape": [batch, *size, 3], "dtype": "float32",
                "layout": "NHWC, RGB, 0-255; normalised inside the model with mean and std"},
      "output": {"name": OUTPUT_NAME, "shape": [batch, *size, info.num_classes],
                 "dtype": "float32",
                 "meaning": "class scores at the input size (logits; averaged probabilities "
                            "under test-time augmentation or inference.average='probs' "
                            "windows): the argmax is the predicted train id"},
      "class_names": list(info.class_names),
      "palette": np.asarray(info.palette).tolist(),
      "label_ids": {str(k): int(v) for k, v in info.train_to_id},
      "mean": list(config.data.mean),
      "std": list(config.data.std),
      "model": config.model.name,
      "inference": dict(config.get("inference", {})) if config.get("inference") else {},
      "checkpoint": {"workdir": os.path.abspath(workdir), "step": int(step),
                     "requested": str(checkpoint), "state": state},
      "versions": _versions(fmt),
  }


def _versions(fmt: str) -> dict:
  names = {"stablehlo": ("jax",), "savedmodel": ("jax", "tensorflow-cpu"),
           "tflite": ("jax", "tensorflow-cpu"),
           "onnx": ("jax", "tensorflow-cpu", "tf2onnx", "onnx", "onnxruntime")}[fmt]
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    f.write("\n")


def _replace(folder: str, output: str) -> None:
  """Renames the complete `folder` to `output`, replacing an earlier artifact there."""
  for root, _, names in os.walk(folder):  # On disk before the rename makes it visible.
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        os.fsync(f.fileno())
  if os.path.lexists(output):
    if not os.path.isfile(os.path.join(output, METADATA)):
      raise ExportError(f"--output={output} exists and is not an exported model; choose "
                        "another --output, or remove it.")
    old = f"{folder}.old"
    os.rename(output, old)
    os.rename(folder, output)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(folder, output)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  config = FLAGS.config
  size = parse_size(FLAGS.size) if FLAGS.size else tuple(config.data.eval.get("resize", ()))
  if len(size) != 2:
    raise ExportError("--size is needed: data.eval.resize is not set, so the config gives no "
                      "working resolution (e.g. --size=512x1024).")
  path, checked = export(config, FLAGS.workdir, FLAGS.format, size, checkpoint=FLAGS.checkpoint,
                         state=FLAGS.state, batch=FLAGS.batch, quantize=FLAGS.quantize,
                         calibration_images=FLAGS.calibration_images,
                         verify_images=FLAGS.verify_images, output=FLAGS.output,
                         export_platforms=tuple(FLAGS.platforms))
  print(f"Exported {FLAGS.format} ({FLAGS.quantize}) to {path}: {checked.describe()}.",
        flush=True)


def define_flags():
  """The command's flags, defined when it runs: absl refuses a flag defined twice in a process."""
  cli.define_run_flags()
  cli.define_state_flag()
  flags.DEFINE_enum("format", None, FORMATS, "The artifact's format.")
  flags.DEFINE_string("size", None, "Input HEIGHTxWIDTH, e.g. 512x1024 (default: "
                      "data.eval.resize).")
  flags.DEFINE_integer("batch", 1, "Batch of the fixed-batch formats (tflite, onnx).")
  flags.DEFINE_enum("quantize", "float32", ("float32", "float16", "int8"),
                    "TFLite only: float16 weights, or int8 post-training quantisation.")
  flags.DEFINE_integer("calibration_images", 100, "int8: images of data.target to calibrate on.")
  flags.DEFINE_integer("verify_images", 4, "Images of data.target the artifact is checked on.")
  flags.DEFINE_string("output", None, "The artifact's folder (default: "
                      "{workdir}/export/<format>[_<quantize>]_<H>x<W>).")
  flags.DEFINE_list("platforms", ["cpu", "cuda"], "stablehlo and savedmodel: the platforms "
                    "the artifact runs on.")
  flags.mark_flags_as_required(["config", "workdir", "format"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
