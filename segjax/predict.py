"""Segments a folder of images, or a video, with a training run's checkpoint or an exported model.

  python -m segjax.predict \
      --config=configs/deeplabv2_gta5_cityscapes.py:cityscapes=/data/cityscapes \
      --workdir=runs/deeplabv2 --checkpoint=best \
      --input=/data/cityscapes/leftImg8bit/test --output=runs/deeplabv2/test_predictions
  python -m segjax.predict --model=runs/bisenet/export/onnx_512x1024 --input=DIR --output=OUT
  python -m segjax.predict --model=runs/bisenet/export/onnx_512x1024 --video=IN.mp4 --out=OUT.mp4

The model is either the segmenter of a checkpoint, restored read-only from
{workdir}/checkpoints (--checkpoint: 'latest', 'best' or a step number;
--state: 'seg', or MPL's 'teacher', self_training's 'ema') onto one device and
run in inference mode with `config.inference` (test-time augmentation, sliding
windows), each image resized to `config.data.eval.resize` when the config sets
one (the resolution the network was trained at; else the native size); or
--model, a folder written by `segjax.export` (StableHLO, SavedModel, TFLite or
ONNX, run by jax, TensorFlow, the TFLite interpreter or onnxruntime), each
image resized to the artifact's input size. Either way the scores are
upsampled to the image's native size before the argmax, so both give the same
predictions (tests/test_export.py).

--input: every .png, .jpg and .jpeg under it (recursively) is segmented and
written under --output in the image's folder relative to --input:

  <stem>_trainIds.png  the predicted classes (train ids)
  <stem>_labelIds.png  Cityscapes label ids, for the Cityscapes label space only
                       (what the benchmark server takes)
  <stem>_color.png     the classes in the dataset's palette
  <stem>_overlay.png   the image blended 50% with the colours

An image that cannot be read (truncated, not an image) is skipped with a
warning naming it, so every readable image gets its predictions; the end
counts the skipped ones, and the exit status is then 1, so that a script
notices.

--video: the frames (read by OpenCV) are segmented --batch_size at a time
and --output (alias --out) is the overlay video (mp4v), at the input's size and
frame rate; a progress bar shows the frames per second reached, and the end
prints it. The video is written beside --output and renamed into place when
complete, so an interrupted run leaves no truncated file.
"""

import dataclasses
import functools
import os
import time

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.sharding import Mesh
from PIL import Image

from segjax import cli, data, errors, evaluate, export, inference, parallel, reporting, steps
from segjax.data import files
from segjax.models import layers

FLAGS = flags.FLAGS
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(folder: str, exclude: str | None = None) -> list[str]:
  """Paths relative to `folder` of its images, sorted, skipping the folder `exclude`.

  DataError naming the folder when it is missing or holds no image.
  """
  if not os.path.isdir(folder):
    raise data.DataError(f"--input={folder} is not a directory; expected a folder of images "
                            f"({', '.join(IMAGE_EXTENSIONS)}).")
  exclude = os.path.abspath(exclude) if exclude else None
  found = []
  for directory, subdirs, names in os.walk(folder):
    subdirs[:] = sorted(d for d in subdirs
                        if os.path.abspath(os.path.join(directory, d)) != exclude)
    found += [os.path.relpath(os.path.join(directory, name), folder) for name in names
              if name.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise data.DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under --input={folder}.")
  return sorted(found)


class CheckpointPredictor:
  """The segmenter of a training run's checkpoint: uint8 images (N, H, W, 3) of one size ->
  train ids (N, *out_size) uint8, in inference mode with `config.inference`.

  Images are resized (bicubic) to `config.data.eval.resize` when the config
  sets one, and the scores upsampled to `out_size` before the argmax.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "latest",
               state: str = "seg"):
    evaluate.check_model(config)
    evaluate.check_label_space(config)
    info = data.dataset_info(config.data.eval, "data.eval")
    self.palette, self.label_ids = info.palette, dict(info.train_to_id)
    self.size = tuple(config.data.eval.get("resize", ()))
    self.mesh = Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
    self.seg_state, self.step = evaluate.restore_segmenter(config, workdir, checkpoint,
                                                           self.mesh, state)
    self.source = f"the segmenter {state!r} of step {self.step} of {workdir}"
    self._predict = jax.jit(functools.partial(
        steps.predict_labels, mean=tuple(config.data.mean), std=tuple(config.data.std),
        inference=inference.Inference.from_config(config.get("inference"))), static_argnums=2)

  def __call__(self, images: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    resized = np.stack([_resize(image, self.size) for image in images])
    batch = jax.device_put(resized, parallel.replicated(self.mesh))
    return np.asarray(self._predict(self.seg_state, batch, tuple(out_size))).astype(np.uint8)


class ArtifactPredictor:
  """An exported model (`segjax.export`), run by its format's runtime, with the same outputs
  as the checkpoint it came from: images resized (bicubic) to its input size, its scores
  upsampled to `out_size` (bilinear) before the argmax."""

  def __init__(self, path: str):
    self.artifact = export.Artifact(path)
    self.palette, self.label_ids = self.artifact.palette, self.artifact.label_ids
    self.source = (f"the {self.artifact.format} model {path} (step "
                   f"{self.artifact.metadata['checkpoint']['step']})")
    self._labels = jax.jit(
        lambda scores, out_size: jnp.argmax(layers.resize_bilinear(scores, *out_size), -1),
        static_argnums=1)

  def __call__(self, images: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    resized = np.stack([_resize(image, self.artifact.size) for image in images])
    return np.asarray(self._labels(self.artifact(resized), tuple(out_size))).astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
  """`image` at `size` (bicubic), or as it is for an empty `size` (the native resolution)."""
  return export.resize_image(image, size) if size else image


@dataclasses.dataclass
class Predicted:
  """What `predict_folder` did: the images written, and why each unreadable one was skipped."""
  written: int
  unreadable: list[str]


def predict_folder(predictor, input_dir: str, output_dir: str) -> Predicted:
  """Writes the predictions of every readable image under `input_dir` by `predictor`
  (`CheckpointPredictor` or `ArtifactPredictor`).

  An unreadable image is skipped (a warning names it); DataError if none can
  be read.
  """
  images = list_images(input_dir, exclude=output_dir)
  label_ids = None
  if predictor.label_ids:
    label_ids = np.zeros(256, np.uint8)
    for train_id, label_id in predictor.label_ids.items():
      label_ids[train_id] = label_id
  logging.info("Predicting %d images under %s with %s.", len(images), input_dir,
               predictor.source)
  done = Predicted(written=0, unreadable=[])
  for relative in tqdm.tqdm(images, desc="segjax.predict", unit="img"):
    try:
      image = files.read_image(os.path.join(input_dir, relative))
    except data.DataError as e:
      logging.warning("Skipped: %s", e)
      done.unreadable.append(str(e))
      continue
    train_ids = predictor(image[None], image.shape[:2])[0]
    stem = os.path.join(output_dir, os.path.splitext(relative)[0])
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    Image.fromarray(train_ids).save(stem + "_trainIds.png")
    if label_ids is not None:
      Image.fromarray(label_ids[train_ids]).save(stem + "_labelIds.png")
    Image.fromarray(reporting.colorize(train_ids, predictor.palette)).save(stem + "_color.png")
    Image.fromarray(reporting.overlay(image, train_ids, predictor.palette)).save(
        stem + "_overlay.png")
    done.written += 1
  if not done.written:
    raise data.DataError(f"None of the {len(images)} images under --input={input_dir} could be "
                         f"read, e.g. {done.unreadable[0]}")
  return done


@dataclasses.dataclass
class VideoPredicted:
  frames: int
  seconds: float

  @property
  def frames_per_second(self) -> float:
    return self.frames / max(self.seconds, 1e-9)


def predict_video(predictor, video: str, output: str, batch_size: int = 8) -> VideoPredicted:
  """Writes `output`, the video `video` with each frame blended 50% with its predicted
  colours, at the input's frame rate and size; frames are segmented `batch_size` at a time.

  The video is written to a temporary file beside `output` and renamed into
  place when complete: an interrupted run leaves no truncated video.
  """
  capture = cv2.VideoCapture(video)
  if not os.path.isfile(video) or not capture.isOpened():
    raise data.DataError(f"--video={video}: cannot be opened as a video (OpenCV "
                         f"{cv2.__version__}); expected e.g. an .mp4 or .avi file.")
  fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
  width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
  height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
  total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
  stem, extension = os.path.splitext(output)
  partial = f"{stem}.partial-{os.getpid()}{extension or '.mp4'}"
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  writer = cv2.VideoWriter(partial, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
  if not writer.isOpened():
    capture.release()
    raise data.DataError(f"--output={output}: OpenCV cannot write a video there (codec mp4v).")
  logging.info("Segmenting %s (%dx%d, %.2f fps) with %s.", video, width, height, fps,
               predictor.source)
  frames, start = 0, time.monotonic()
  try:
    with tqdm.tqdm(total=total, desc="segjax.predict", unit="frame") as progress:
      while True:
        batch = []
        while len(batch) < batch_size:
          ok, frame = capture.read()
          if not ok:
            break
          batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if not batch:
          break
        for image, train_ids in zip(batch, predictor(np.stack(batch), (height, width))):
          blended = reporting.overlay(image, train_ids, predictor.palette)
          writer.write(cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
        frames += len(batch)
        progress.update(len(batch))
        progress.set_postfix(fps=f"{frames / (time.monotonic() - start):.1f}")
    writer.release()
    if not frames:
      raise data.DataError(f"--video={video}: no frame could be read.")
    os.replace(partial, output)
  except BaseException:
    writer.release()
    if os.path.exists(partial):
      os.remove(partial)
    raise
  finally:
    capture.release()
  return VideoPredicted(frames=frames, seconds=time.monotonic() - start)


def build_predictor():
  """--model's artifact, or the checkpoint of --config and --workdir."""
  if FLAGS.model:
    if FLAGS.workdir:
      raise errors.UserError("--model and --workdir both name a model: give one (--model, an "
                             "exported folder; or --config and --workdir, a training run).")
    return ArtifactPredictor(FLAGS.model)
  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.UserError("No model: give --config and --workdir (a training run's "
                           "checkpoint), or --model (a folder written by segjax.export).")
  return CheckpointPredictor(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.state)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(FLAGS.input) == bool(FLAGS.video):
    raise errors.UserError("Give one of --input (a folder of images) and --video (a video "
                           "file).")
  reporting.quiet_libraries()
  predictor = build_predictor()
  if FLAGS.video:
    done = predict_video(predictor, FLAGS.video, FLAGS.output, FLAGS.batch_size)
    print(f"Wrote {done.frames} frames to {FLAGS.output} at {done.frames_per_second:.1f} frames "
          "per second.", flush=True)
    return
  done = predict_folder(predictor, FLAGS.input, FLAGS.output)
  print(f"Wrote the predictions of {done.written} images to {FLAGS.output}.", flush=True)
  if done.unreadable:
    shown = "\n  ".join(done.unreadable[:10])
    more = f"\n  ... and {len(done.unreadable) - 10} more" if len(done.unreadable) > 10 else ""
    raise errors.UserError(f"{len(done.unreadable)} of {done.written + len(done.unreadable)} "
                           f"images under --input={FLAGS.input} could not be read, so they have "
                           f"no predictions:\n  {shown}{more}")


def define_flags():
  """The command's flags, defined when it runs: absl refuses a flag defined twice in a process."""
  cli.define_run_flags()
  cli.define_state_flag()
  flags.DEFINE_string("model", None, "A folder written by segjax.export, instead of --config "
                      "and --workdir.")
  flags.DEFINE_string("input", None, "Folder of images (.png, .jpg, .jpeg), read recursively.")
  flags.DEFINE_string("video", None, "A video file (.mp4, .avi, ...), instead of --input.")
  flags.DEFINE_string("output", None, "Folder for the predictions (created); with --video, the "
                      "overlay video (.mp4).")
  flags.DEFINE_alias("out", "output")
  flags.DEFINE_integer("batch_size", 8, "--video: frames segmented together.")
  flags.mark_flags_as_required(["output"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
