"""Evaluates a checkpoint of a training run: per-class IoU, mIoU and accuracies of a labelled split.

  python -m segjax.evaluate \
      --config=configs/deeplabv2_gta5_cityscapes.py:gta5=/data/GTA5,cityscapes=/data/cityscapes \
      --workdir=runs/deeplabv2 --checkpoint=best --config.data.eval.split=val \
      --config.inference.flip=True --config.inference.scales=0.75,1.0,1.25 \
      --save_predictions=runs/deeplabv2/val_predictions

The config is the training run's; any field can be overridden. Only the
segmenter is restored from {workdir}/checkpoints (--checkpoint: 'latest',
'best' by the mIoU of training's evaluations, or a step number), read-only,
so a run still training is not disturbed. --state picks which segmenter:
'seg' (default; MPL's student), or another state of the run's method that
holds the same model (MPL's 'teacher', self_training's EMA teacher 'ema').
The split is evaluated with the step training evaluates with
(`segjax.steps.eval_step`: BatchNorm running statistics, no dropout,
`config.inference` test-time augmentation and sliding windows),
data-parallel over all local devices, at the labels' resolution: with
`data.eval.resize_labels=False` images are read at `data.eval.resize` and
the scores upsampled to the full-resolution labels.

Results: a table on the console; TensorBoard and metrics.jsonl in
{workdir}/eval (beside, not inside, the training run's files); and
{workdir}/eval/<split>_step<N>.json with every number, the checkpoint, the
data.eval and inference configs and the number of images. Another --state
writes <split>_step<N>_<state>.json and its scalars under <split>/<state>/.

--save_predictions=DIR writes each image's prediction at the labels'
resolution: <image stem>_trainIds.png and, for the Cityscapes label space,
<image stem>_labelIds.png (Cityscapes label ids, what cityscapesscripts and
the benchmark server evaluate), in the image's city folder (DIR/frankfurt/...)
when it has one under leftImg8bit/<split>, else directly in DIR.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from PIL import Image

from segjax import (checkpointing, cli, data, errors, evaluation, inference, methods, metrics,
                    models, parallel, reporting, states)
from segjax.data import pipeline

FLAGS = flags.FLAGS
EVAL_SUBDIR = "eval"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails early with a ConfigError naming the field on an evaluation config that cannot work."""
  with errors.config_checks():
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
  check_model(config)
  check_label_space(config)


def check_model(config: ml_collections.ConfigDict) -> None:
  """The segmenter (config.model) and the test-time augmentation (config.inference) must be
  buildable; ConfigError naming the field."""
  with errors.config_checks():
    models.build_segmenter(config.model, 1)
    inference.Inference.from_config(config.get("inference"))


def check_label_space(config: ml_collections.ConfigDict) -> None:
  """data.eval must name data.source's classes: the checkpoint predicts those."""
  source_info = data.dataset_info(config.data.source, "data.source")
  eval_info = data.dataset_info(config.data.eval, "data.eval")
  if eval_info.class_names != source_info.class_names:
    raise errors.ConfigError(f"data.eval ({config.data.eval.name}) and data.source "
                             f"({config.data.source.name}) do not share one label space: the "
                             "checkpoint predicts data.source's classes.")


def restore_segmenter(config: ml_collections.ConfigDict, workdir: str, checkpoint: str,
                      mesh, state: str = "seg") -> tuple:
  """The segmenter `state` of `checkpoint` (replicated on `mesh`) and its step.

  `state` is 'seg' or another of the method's states holding the segmenter's
  model (MPL's 'teacher', self_training's 'ema'); it comes back as a
  segmenter TrainState with that state's parameters and BatchNorm statistics.
  Only the items needed are read: the discriminators and the data iterator
  stay on disk. CheckpointError, naming the method's states, for any other;
  and, for a checkpoint of another model, width, number of classes or
  optimizer than `config`'s, naming what differs (`describe_mismatch`).
  """
  directory = os.path.join(workdir, "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=1, read_only=True)
  try:
    step = ckpt.select_step(checkpoint)
    num_classes = data.dataset_info(config.data.source, "data.source").num_classes
    targets = {"seg": states.abstract_seg_state(config, num_classes, mesh)}
    if state != "seg":  # 'seg' gives the TrainState around the other state's variables.
      targets[state] = _abstract_segmenter_state(config, num_classes, mesh, state,
                                                 targets["seg"].params)
    # Checked before restoring: Orbax's errors name neither the array nor the config field.
    mismatch = describe_mismatch(config, workdir, step, targets, num_classes)
    if mismatch:
      raise checkpointing.CheckpointError(
          f"--checkpoint={checkpoint} (step {step} of {workdir}) does not fit this config: "
          f"{mismatch}")
    restored = ckpt.restore_states(step, targets)
  finally:
    ckpt.close()
  seg_state = restored["seg"]
  if state != "seg":
    other = restored[state]
    seg_state = seg_state.replace(params=_field(other, "params"),
                                  batch_stats=_field(other, "batch_stats"))
  logging.info("Restored the segmenter %r of step %d (--checkpoint=%s) from %s.", state, step,
               checkpoint, workdir)
  return seg_state, step


def describe_mismatch(config: ml_collections.ConfigDict, workdir: str, step: int,
                      targets: dict, num_classes: int) -> str | None:
  """What differs between the checkpoint's states and the restore `targets` built from
  `config`, and the config fields likely responsible; None if nothing is found to differ.

  Compares the arrays' paths and shapes with those the checkpoint stores
  (`_stored_shapes`): the first parameter (or BatchNorm statistic) the two
  do not share or whose shape differs, else the first differing optimizer
  state. Then the fields that shape these: those that differ from the run's
  own config.json when the workdir has one, else their values here.
  """
  for name, target in targets.items():
    stored = _stored_shapes(workdir, step, name)
    if stored is None:
      return None
    wanted = _shapes(target)
    difference = (_first_difference(stored, wanted, "params")
                  or _first_difference(stored, wanted, "batch_stats")
                  or _first_difference(stored, wanted, ""))
    if difference is None:
      continue
    path, in_checkpoint, here = difference
    model_part = path.split("/")[0] in ("params", "batch_stats")
    fields = (("model.", "data.source.name", "data.source.label_space") if model_part
              else ("optim.seg.",))
    what = (f"the state {name!r}: {path} is {_show(in_checkpoint)} in the checkpoint and "
            f"{_show(here)} for this config")
    return f"{what}. {_responsible_fields(config, workdir, fields, num_classes, model_part)}"
  return None


def _stored_shapes(workdir: str, step: int, name: str) -> dict[str, tuple] | None:
  """{array path: shape} of the state `name` in the checkpoint of `step`, read from its
  metadata (no array is read); None if it cannot be read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(workdir, "checkpoints", str(step), name))
  except (OSError, ValueError):
    return None
  finally:
    handler.close()
  return _shapes(metadata.tree)


def _shapes(tree) -> dict[str, tuple]:
  """{'params/Conv_0/kernel': shape} of a pytree of arrays (or their metadata)."""
  def key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _first_difference(stored: dict, wanted: dict, part: str):
  """(path, shape in the checkpoint or None, shape wanted or None) of the first array under
  the top-level `part` (any if empty) that is missing on one side or shaped differently."""
  for path in sorted(set(stored) | set(wanted)):
    if path.startswith(part) and stored.get(path) != wanted.get(path):
      return path, stored.get(path), wanted.get(path)
  return None


def _show(shape: tuple | None) -> str:
  return "absent" if shape is None else str(shape)


def _responsible_fields(config: ml_collections.ConfigDict, workdir: str,
                        prefixes: tuple[str, ...], num_classes: int, model_part: bool) -> str:
  """The config fields starting with one of `prefixes` that differ from the run's config.json,
  or, without one, those fields' values here (and the number of classes for the model)."""
  here = _flatten(config.to_dict())
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      trained = _flatten(json.load(f))
    differ = [key for key in sorted(set(here) | set(trained))
              if key.startswith(prefixes) and _comparable(here.get(key)) !=
              _comparable(trained.get(key))]
    if differ:
      fix = " ".join(f"--config.{key}={trained[key]}" for key in differ if key in trained)
      return ("These fields differ from the run's config.json: " + "; ".join(
          f"{key}: {trained.get(key, 'absent')!r} in the run, {here.get(key, 'absent')!r} here"
          for key in differ) + (f". Pass the run's values: {fix}" if fix else "."))
  shown = [f"{key}={here[key]!r}" for key in sorted(here) if key.startswith(prefixes)]
  classes = (f" and the {num_classes} classes of data.source ({config.data.source.name})"
             if model_part else "")
  return (f"The fields that shape it are {', '.join(shown)}{classes}: pass the training run's "
          "config and overrides.")


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _comparable(value):
  """JSON's view of a value: config.json stores tuples as lists."""
  return json.loads(json.dumps(value, default=str))


def _field(state, name: str):
  return state[name] if isinstance(state, dict) else getattr(state, name)


def _abstract_segmenter_state(config: ml_collections.ConfigDict, num_classes: int, mesh,
                              state: str, seg_params):
  """The restore target of the method's state `state`, checked to hold the segmenter's model
  (parameters shaped as `seg_params`)."""
  method = methods.build(config, num_classes)
  init_seg = states.segmenter_init(config, jax.random.key(0), num_classes)[0]
  inits = method.state_inits(jax.random.key(0), init_seg)
  name = config.adapt.method
  if state not in inits:
    raise checkpointing.CheckpointError(
        f"--state={state!r}: adapt.method {name!r} keeps the states {sorted(inits)}; "
        "pick one holding the segmenter ('seg' is the network evaluated during training).")
  abstract = states.abstract_replicated(inits[state], mesh)
  params = (abstract.get("params") if isinstance(abstract, dict)
            else getattr(abstract, "params", None))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  if params is None or shapes(params) != shapes(seg_params):
    raise checkpointing.CheckpointError(
        f"--state={state!r}: that state of adapt.method {name!r} is not a segmenter of "
        f"config.model ({config.model.name}); the method's states are {sorted(inits)}.")
  return abstract


def prediction_names(eval_config: ml_collections.ConfigDict, source) -> list[str]:
  """Output path stems, relative to the predictions folder, of the split's examples in order.

  A file source gives `<city>/<image stem>` for an image under
  `{root}/leftImg8bit/{split}/<city>/` (Cityscapes), else `<image stem>`;
  other sources number their examples.
  """
  pairs = getattr(source, "pairs", None)
  if pairs is None:
    return [f"{index:06d}" for index in range(len(source))]
  base = os.path.abspath(os.path.join(eval_config.get("root", ""), "leftImg8bit",
                                      eval_config.get("split", "")))
  names = []
  for image_path, _ in pairs:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    folder = os.path.relpath(os.path.dirname(os.path.abspath(image_path)), base)
    names.append(stem if folder == "." or folder.startswith("..") else os.path.join(folder, stem))
  if len(set(names)) != len(names):
    duplicate = next(name for name in names if names.count(name) > 1)
    raise data.DataError(f"data.eval: two images would write the predictions {duplicate!r}; "
                         "the split's image names must be unique.")
  return names


class PredictionWriter:
  """Writes the predictions of evaluation batches as label PNGs (the `on_predictions` callback).

  Local batch i of process p holds the examples [i*B + p*B/P, i*B + (p+1)*B/P)
  of the split (B the global batch, P the processes; `pipeline._process_slice`);
  the padding records past the split's end are not written.
  """

  def __init__(self, directory: str, names: list[str], source, eval_config, global_batch: int,
               info: data.DatasetInfo):
    self._directory = directory
    self._names = names
    self._source = source
    self._global_batch = global_batch
    self._rows = global_batch // jax.process_count()
    self._first_row = jax.process_index() * self._rows
    self._padded = bool(eval_config.get("pad_to"))
    resize = tuple(eval_config.get("resize", ()))
    self._label_size = resize if resize and eval_config.get("resize_labels", True) else None
    self._label_ids = None
    if info.train_to_id:
      self._label_ids = np.zeros(256, np.uint8)
      for train_id, label_id in info.train_to_id:
        self._label_ids[train_id] = label_id
    self.written = 0

  def _size(self, index: int) -> tuple[int, int]:
    """The (height, width) of example `index`'s label: its crop out of a padded batch."""
    if self._label_size:
      return self._label_size
    with Image.open(self._source.pairs[index][0]) as image:  # Labels match their images' size.
      return image.size[::-1]

  def __call__(self, batch_index: int, preds: np.ndarray) -> None:
    first = batch_index * self._global_batch + self._first_row
    for row, pred in enumerate(preds):
      index = first + row
      if index >= len(self._names):
        return
      if self._padded:
        height, width = self._size(index)
        pred = pred[:height, :width]
      path = os.path.join(self._directory, self._names[index])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      train_ids = pred.astype(np.uint8)
      Image.fromarray(train_ids).save(path + "_trainIds.png")
      if self._label_ids is not None:
        Image.fromarray(self._label_ids[train_ids]).save(path + "_labelIds.png")
      self.written += 1


def _finite_or_none(value: float) -> float | None:
  return float(value) if np.isfinite(value) else None


def format_table(report: dict) -> str:
  """The console table: per-class IoU, then the means and accuracies, in %."""
  def percent(value):
    return "     n/a" if value is None else f"{100 * value:8.2f}"

  lines = [f"{report['dataset']} {report['split']}: {report['num_images']} images, step "
           f"{report['step']} (--checkpoint={report['checkpoint']})",
           f"{'class':<20}{'IoU %':>8}", "-" * 28]
  lines += [f"{name:<20}{percent(iou)}" for name, iou in report["iou"].items()]
  lines.append("-" * 28)
  lines.append(f"{'mIoU':<20}{percent(report['miou'])}")
  lines += [f"{name.replace('miou', 'mIoU'):<20}{percent(report[name])}"
            for name in report["subsets"]]
  lines.append(f"{'pixel accuracy':<20}{percent(report['pixel_acc'])}")
  lines.append(f"{'mean accuracy':<20}{percent(report['mean_acc'])}")
  return "\n".join(lines)


def _write_json(path: str, report: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, path)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = "latest",
                        save_predictions: str | None = None, state: str = "seg") -> dict:
  """Evaluates the segmenter `state` of `checkpoint` in `workdir` on `config.data.eval`.

  Returns the report, also written (by process 0) to
  {workdir}/eval/<split>_step<N>.json (another state than 'seg':
  <split>_step<N>_<state>.json): IoU per class (None where a class is in
  neither labels nor predictions), mIoU and the extra subsets, pixel and mean
  accuracy, the confusion matrix (rows labels, columns predictions), the
  step, the checkpoint choice and state, the data.eval and inference configs
  and the number of images.
  """
  check_config(config)
  is_primary = jax.process_index() == 0
  mesh = parallel.make_mesh()
  info = data.dataset_info(config.data.eval, "data.eval")
  split = config.data.eval.get("split", "eval")
  # The original files (a cache names its files by index): their names and whether labelled.
  listed = data.build_source(config.data.eval, "data.eval", use_cache=False)
  if not getattr(listed, "labelled", True):
    raise data.DataError(f"data.eval: the split {split!r} of {config.data.eval.name} has no "
                         "labels (config field data.eval.split); evaluate a labelled split, or "
                         "predict it with python -m segjax.predict.")
  names = prediction_names(config.data.eval, listed) if save_predictions else []
  seg_state, step = restore_segmenter(config, workdir, checkpoint, mesh, state)
  eval_ds, num_images = pipeline.eval_dataset(config, process_index=jax.process_index(),
                                              process_count=jax.process_count())
  eval_step = parallel.compile_all(
      {"eval_step": evaluation.make_eval_step(config, info.num_classes, mesh)},
      {"eval_step": (seg_state, parallel.global_batch_spec(eval_ds[0], mesh),
                     evaluation.confusion_spec(info.num_classes, mesh))})["eval_step"]
  writer = None
  if save_predictions:
    writer = PredictionWriter(save_predictions, names, listed, config.data.eval,
                              config.eval_batch_size, info)
  confusion, samples = evaluation.evaluate(eval_step, seg_state, eval_ds, mesh,
                                           info.num_classes, config.num_eval_samples,
                                           on_predictions=writer)
  if writer is not None:
    logging.info("Wrote the predictions of %d images to %s.", writer.written, save_predictions)

  subsets = evaluation.eval_subsets(config)
  result = metrics.scores(confusion, subsets)
  report = {
      "step": int(step), "checkpoint": str(checkpoint), "state": state,
      "workdir": os.path.abspath(workdir),
      "dataset": config.data.eval.name, "split": split, "num_images": int(num_images),
      "miou": _finite_or_none(result["miou"]),
      **{name: _finite_or_none(result[name]) for name, _ in subsets},
      "subsets": {name: list(classes) for name, classes in subsets},
      "pixel_acc": _finite_or_none(result["pixel_acc"]),
      "mean_acc": _finite_or_none(result["mean_acc"]),
      "iou": {name: _finite_or_none(iou) for name, iou in zip(info.class_names, result["iou"])},
      "confusion_matrix": np.asarray(confusion).tolist(),
      "data_eval": config.data.eval.to_dict(),
      "inference": config.inference.to_dict() if "inference" in config else {},
  }
  if is_primary:
    print(format_table(report), flush=True)
    out_dir = os.path.join(workdir, EVAL_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    suffix = "" if state == "seg" else f"_{state}"
    path = os.path.join(out_dir, f"{split}_step{step}{suffix}.json")
    _write_json(path, report)
    logging.info("Wrote %s.", path)
  metric_writer = reporting.create_writer(os.path.join(workdir, EVAL_SUBDIR),
                                          is_primary=is_primary)
  summary = evaluation.eval_summary(confusion, info.class_names, subsets)
  prefix = split if state == "seg" else f"{split}/{state}"
  metric_writer.write_scalars(step, {f"{prefix}/{key.removeprefix('eval/')}": value
                                     for key, value in summary.items()})
  if samples:
    metric_writer.write_images(step, {f"{prefix}/samples": reporting.sample_grid(
        samples["image"], samples["pred"], samples["label"], info.palette)})
  metric_writer.close()
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  parallel.log_topology()
  evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.save_predictions,
                      FLAGS.state)


def define_flags():
  """The command's flags, defined when it runs: absl refuses a flag defined twice in a process."""
  cli.define_run_flags()
  cli.define_state_flag()
  flags.DEFINE_string("save_predictions", None,
                      "Folder for the predictions as PNGs (trainIds, and Cityscapes labelIds).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
