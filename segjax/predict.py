"""Predicts a folder of images with a checkpoint of a training run: label maps, colours, overlays.

  python -m segjax.predict \
      --config=configs/deeplabv2_gta5_cityscapes.py:cityscapes=/data/cityscapes \
      --workdir=runs/deeplabv2 --checkpoint=best \
      --input=/data/cityscapes/leftImg8bit/test --output=runs/deeplabv2/test_predictions

Every .png, .jpg and .jpeg under --input (recursively) is read, resized to
`config.data.eval.resize` when the config sets one (the working resolution the
network was trained at; else the native size), segmented in inference mode
with `config.inference` (test-time augmentation, sliding windows), the scores
upsampled to the image's native size, and written under --output in the
image's folder relative to --input:

  <stem>_trainIds.png  the predicted classes (train ids)
  <stem>_labelIds.png  Cityscapes label ids, for the Cityscapes label space only
                       (what the benchmark server takes)
  <stem>_color.png     the classes in the dataset's palette
  <stem>_overlay.png   the image blended 50% with the colours

The segmenter is restored read-only from {workdir}/checkpoints (--checkpoint:
'latest', 'best' or a step number; --state: 'seg', or MPL's 'teacher',
self_training's 'ema') onto one device; images are predicted one
at a time (one compilation per distinct image size).

An image that cannot be read (truncated, not an image) is skipped with a
warning naming it, so every readable image gets its predictions; the end
counts the skipped ones, and the exit status is then 1, so that a script
notices.
"""

import dataclasses
import functools
import os

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.sharding import Mesh
from PIL import Image

from segjax import cli, data, errors, evaluate, inference, parallel, reporting, steps
from segjax.data import files

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


def make_predictor(config: ml_collections.ConfigDict):
  """A jitted (seg_state, image (1, H, W, 3) uint8, out_size) -> (1, *out_size) train ids."""
  return jax.jit(functools.partial(
      steps.predict_labels, mean=tuple(config.data.mean), std=tuple(config.data.std),
      inference=inference.Inference.from_config(config.get("inference"))),
                 static_argnums=2)


def _resize(image: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
  """Bicubic, like the datasets' readers (`segjax.data.files`)."""
  if not size or image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


@dataclasses.dataclass
class Predicted:
  """What `predict_folder` did: the images written, and why each unreadable one was skipped."""
  written: int
  unreadable: list[str]


def predict_folder(config: ml_collections.ConfigDict, workdir: str, input_dir: str,
                   output_dir: str, checkpoint: str = "latest", state: str = "seg") -> Predicted:
  """Writes the predictions of every readable image under `input_dir`.

  An unreadable image is skipped (a warning names it); DataError if none can
  be read.
  """
  evaluate.check_model(config)
  evaluate.check_label_space(config)
  info = data.dataset_info(config.data.eval, "data.eval")
  images = list_images(input_dir, exclude=output_dir)
  mesh = Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
  seg_state, step = evaluate.restore_segmenter(config, workdir, checkpoint, mesh, state)
  predictor = make_predictor(config)
  size = tuple(config.data.eval.get("resize", ()))
  label_ids = None
  if info.train_to_id:
    label_ids = np.zeros(256, np.uint8)
    for train_id, label_id in info.train_to_id:
      label_ids[train_id] = label_id
  logging.info("Predicting %d images under %s with the segmenter of step %d.", len(images),
               input_dir, step)
  done = Predicted(written=0, unreadable=[])
  for relative in tqdm.tqdm(images, desc="segjax.predict", unit="img"):
    try:
      image = files.read_image(os.path.join(input_dir, relative))
    except data.DataError as e:
      logging.warning("Skipped: %s", e)
      done.unreadable.append(str(e))
      continue
    native = image.shape[:2]
    batch = jax.device_put(_resize(image, size)[None], parallel.replicated(mesh))
    train_ids = np.asarray(predictor(seg_state, batch, native)[0]).astype(np.uint8)
    stem = os.path.join(output_dir, os.path.splitext(relative)[0])
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    Image.fromarray(train_ids).save(stem + "_trainIds.png")
    if label_ids is not None:
      Image.fromarray(label_ids[train_ids]).save(stem + "_labelIds.png")
    Image.fromarray(reporting.colorize(train_ids, info.palette)).save(stem + "_color.png")
    Image.fromarray(reporting.overlay(image, train_ids, info.palette)).save(stem + "_overlay.png")
    done.written += 1
  if not done.written:
    raise data.DataError(f"None of the {len(images)} images under --input={input_dir} could be "
                         f"read, e.g. {done.unreadable[0]}")
  return done


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  done = predict_folder(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                        FLAGS.checkpoint, FLAGS.state)
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
  flags.DEFINE_string("input", None, "Folder of images (.png, .jpg, .jpeg), read recursively.")
  flags.DEFINE_string("output", None, "Folder for the predictions (created).")
  flags.mark_flags_as_required(["config", "workdir", "input", "output"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
