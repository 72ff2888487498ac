"""segjax.export and segjax.predict --model / --video, on configs/test_cityscapes.py's run.

Each format is exported from the two-step checkpoint of the Cityscapes
fixture (`cityscapes_run`), reloaded with its own runtime (jax, TensorFlow,
the TFLite interpreter, onnxruntime) and compared with the JAX model on the
fixture's real images.
"""

import functools
import glob
import json
import os
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

import e2e
import needs
from configs import test_cityscapes
from segjax import evaluate, export, platforms, predict
from segjax.models import layers

FIXTURE = os.path.join(needs.fixtures_root(), "cityscapes")
SIZE = (64, 128)  # configs/test_cityscapes.py's working resolution.


def _config():
  return test_cityscapes.get_config(FIXTURE)


def _val_images() -> np.ndarray:
  """The fixture's val images (not among data.target's train images), at SIZE."""
  paths = sorted(glob.glob(os.path.join(FIXTURE, "leftImg8bit", "val", "*", "*.png")))
  assert paths
  return np.stack([export.resize_image(np.asarray(Image.open(p).convert("RGB")), SIZE)
                   for p in paths])


def _jax_scores(workdir: str, images: np.ndarray) -> np.ndarray:
  mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
  state, _ = evaluate.restore_segmenter(_config(), workdir, "latest", mesh)
  return np.asarray(jax.jit(export.scores_fn(_config(), state, SIZE))(images.astype(np.float32)))


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_each_format_reloads_and_reproduces_the_model_on_real_images(cityscapes_run, fmt,
                                                                     tmp_path):
  output = str(tmp_path / fmt)
  path, checked = export.export(_config(), cityscapes_run, fmt, SIZE, output=output,
                                verify_images=3)
  assert path == output and sorted(os.listdir(output)) == sorted(
      [export.METADATA, export.MODEL_FILES[fmt]])
  assert not [p for p in os.listdir(tmp_path) if p != fmt], "a partial folder was left"
  assert checked.images == 3 and checked.relative_error <= 1e-4

  with open(os.path.join(output, export.METADATA), encoding="utf-8") as f:
    metadata = json.load(f)
  dynamic = fmt in ("stablehlo", "savedmodel")
  assert metadata["input"]["shape"] == [None if dynamic else 1, *SIZE, 3]
  assert metadata["output"]["shape"][-1] == 19 and len(metadata["class_names"]) == 19
  assert metadata["class_names"][0] == "road" and metadata["palette"][0] == [128, 64, 128]
  assert metadata["mean"] == [0.485, 0.456, 0.406] and metadata["std"] == [0.229, 0.224, 0.225]
  assert metadata["label_ids"]["0"] == 7  # Cityscapes: road's label id.
  assert metadata["checkpoint"]["step"] == 2
  assert metadata["verification"]["relative_error"] == checked.relative_error

  # The held-out val image, and a batch of 3 (padded to the fixed batch where there is one).
  images = np.concatenate([_val_images()] * 3)
  want = _jax_scores(cityscapes_run, images)
  got = export.Artifact(output)(images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("quantize, agreement", [("float16", 0.99), ("int8", 0.85)])
def test_quantised_tflite_keeps_the_predictions(cityscapes_run, quantize, agreement, tmp_path):
  """int8: full-integer, calibrated on data.target. The two-step model's classes are close
  together (measured: 89% argmax agreement); the model of 300 steps agrees on 99.1%
  (benchmarks/slow_tests.py: test_int8_of_a_trained_model_agrees_on_99_percent)."""
  path, checked = export.export(_config(), cityscapes_run, "tflite", SIZE, quantize=quantize,
                                output=str(tmp_path / quantize), verify_images=3)
  assert checked.argmax_agreement >= agreement, checked.describe()
  artifact = export.Artifact(path)
  assert artifact.metadata["quantization"] == quantize
  details = _tflite_tensor_types(os.path.join(path, export.MODEL_FILES["tflite"]))
  assert {"int8": np.int8, "float16": np.float16}[quantize] in details
  if quantize == "float16":  # On the held-out val image too (int8's two-step model: 56%).
    held_out = _val_images()
    want = _jax_scores(cityscapes_run, held_out).argmax(-1)
    assert np.mean(artifact(held_out).argmax(-1) == want) >= agreement


def _tflite_tensor_types(path: str) -> set:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  interpreter = tf.lite.Interpreter(model_path=path)
  return {t["dtype"] for t in interpreter.get_tensor_details()}


@pytest.mark.slow
def test_int8_of_a_trained_model_agrees_on_99_percent(tmp_path, cache_dir):
  """configs/test_cityscapes.py trained 300 steps (2.5 min here): int8 keeps 99% of pixels."""
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.main", f"--config=configs/test_cityscapes.py:{FIXTURE}",
       f"--workdir={workdir}", "--config.num_train_steps=300", "--config.eval_every_steps=300",
       "--config.checkpoint_every_steps=300"], cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir),
      capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, checked = export.export(_config(), workdir, "tflite", SIZE, quantize="int8",
                             output=str(tmp_path / "int8"), verify_images=3)
  assert checked.argmax_agreement >= 0.99, checked.describe()


def test_predict_with_an_artifact_gives_the_checkpoints_predictions(cityscapes_run, tmp_path):
  path, _ = export.export(_config(), cityscapes_run, "onnx", SIZE, output=str(tmp_path / "m"))
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for p in sorted(glob.glob(os.path.join(FIXTURE, "leftImg8bit", "val", "*", "*.png"))):
    Image.open(p).convert("RGB").resize((512, 256)).save(inputs / os.path.basename(p))
  from_artifact = predict.predict_folder(predict.ArtifactPredictor(path), str(inputs),
                                         str(tmp_path / "a"))
  from_checkpoint = predict.predict_folder(
      predict.CheckpointPredictor(_config(), cityscapes_run), str(inputs), str(tmp_path / "c"))
  assert from_artifact.written == from_checkpoint.written == 1
  for kind in ("trainIds", "labelIds", "color"):
    (a,), (c,) = (glob.glob(str(tmp_path / d / f"*_{kind}.png")) for d in ("a", "c"))
    a, c = np.asarray(Image.open(a)), np.asarray(Image.open(c))
    assert a.shape[:2] == (256, 512)
    # Float rounding may flip a pixel whose two best classes tie.
    assert np.mean(np.all(a.reshape(256, 512, -1) == c.reshape(256, 512, -1), -1)) >= 0.999


def test_a_format_that_cannot_express_an_operation_names_it_and_leaves_nothing(
    cityscapes_run, tmp_path, monkeypatch):
  earlier, _ = export.export(_config(), cityscapes_run, "tflite", SIZE,
                             output=str(tmp_path / "model"))
  before = {name: os.path.getmtime(os.path.join(earlier, name)) for name in os.listdir(earlier)}
  scores_fn = export.scores_fn
  monkeypatch.setattr(export, "scores_fn", lambda *args: (
      lambda images: jnp.sort(scores_fn(*args)(images), axis=-1)))
  for fmt in ("tflite", "onnx"):
    with pytest.raises(export.ExportError,
                       match=rf"--format={fmt} cannot express the operations vhlo.sort_v1"):
      export.export(_config(), cityscapes_run, fmt, SIZE, output=str(tmp_path / "model"))
  assert before == {name: os.path.getmtime(os.path.join(earlier, name))
                    for name in os.listdir(earlier)}
  # The earlier artifact is untouched, and no partial folder is left beside it.
  assert os.listdir(tmp_path) == ["model"]
  # A folder left by an export killed outright (SIGKILL: nothing could clean it) goes next time.
  (tmp_path / ".model.partial-dead" / "half").mkdir(parents=True)
  monkeypatch.setattr(export, "scores_fn", scores_fn)
  export.export(_config(), cityscapes_run, "stablehlo", SIZE, output=str(tmp_path / "model"))
  assert os.listdir(tmp_path) == ["model"]


def test_an_artifact_that_disagrees_with_the_model_is_not_written(cityscapes_run, tmp_path,
                                                                 monkeypatch):
  real = export.Artifact.__call__
  monkeypatch.setattr(export.Artifact, "__call__", lambda self, x: real(self, x) * 1.001)
  with pytest.raises(export.ExportError, match=r"does not reproduce the model.*nothing was "
                                               r"written"):
    export.export(_config(), cityscapes_run, "stablehlo", SIZE, output=str(tmp_path / "m"))
  assert not os.listdir(tmp_path)


def test_bad_arguments_name_the_flag():
  with pytest.raises(export.ExportError, match=r"--size='512': expected HEIGHTxWIDTH"):
    export.parse_size("512")
  with pytest.raises(export.ExportError, match=r"--quantize='int8' with --format=onnx: expected "
                                               r"one of float32"):
    export.export(_config(), "unused", "onnx", SIZE, quantize="int8")
  with pytest.raises(export.ExportError, match=r"--format='keras': expected one of stablehlo"):
    export.export(_config(), "unused", "keras", SIZE)
  with pytest.raises(export.ExportError, match=r"--model=.* is not an exported model: no "
                                               r"metadata.json"):
    export.Artifact(os.path.dirname(__file__))


def test_the_export_trace_resizes_by_gathers_and_pools_without_infinities():
  """What TFLite's int8 needs: no interpolation matrices (67% argmax agreement with them), no
  -inf padding (an infinite quantisation range, which crashed BiSeNet's interpreter)."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 13, 4))
  for size in ((36, 52), (20, 17), (5, 7)):
    want = layers.resize_bilinear(x, *size)
    with platforms.compiling_for(platforms.EXPORT):
      got = layers.resize_bilinear(x, *size)
      text = jax.jit(lambda v, s=size: layers.resize_bilinear(v, *s)).lower(x).as_text()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert "gather" in text and "dot_general" not in text
  for window, stride, padding, ceil_mode in ((3, 2, 1, False), (2, 2, 0, True), (3, 2, 0, True)):
    # A new function for each trace: jit caches traces by function, not by platform.
    pool = functools.partial(functools.partial, layers.max_pool, window=window, stride=stride,
                             padding=padding, ceil_mode=ceil_mode)
    want = jax.jit(pool())(x)
    with platforms.compiling_for(platforms.EXPORT):
      got = jax.jit(pool())(x)
      text = jax.jit(pool()).lower(x).as_text()
    np.testing.assert_array_equal(got, want)
    # The window reads no padding: -inf (0xFF800000) is only the reduction's identity.
    assert "padding = dense<[" not in text and text.count("0xFF800000") == 1


def _write_video(path: str, frames: int) -> np.ndarray:
  image = export.resize_image(_val_images()[0], (96, 160))
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 96))
  for i in range(frames):
    writer.write(cv2.cvtColor(np.roll(image, 4 * i, axis=1), cv2.COLOR_RGB2BGR))
  writer.release()
  return image


def test_the_commands_export_and_turn_a_video_into_an_overlay_video(cityscapes_run, tmp_path,
                                                                    cache_dir):
  path = str(tmp_path / "m")
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.export", f"--config=configs/test_cityscapes.py:{FIXTURE}",
       f"--workdir={cityscapes_run}", "--format=stablehlo", "--size=64x128", f"--output={path}"],
      cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Exported stablehlo (float32) to {path}: on 3 images of data.target" in proc.stdout
  video = str(tmp_path / "in.mp4")
  _write_video(video, 7)
  out = str(tmp_path / "out" / "overlay.mp4")
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.predict", f"--model={path}", f"--video={video}",
       f"--out={out}", "--batch_size=3"], cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Wrote 7 frames to" in proc.stdout and "frames per second" in proc.stdout
  assert os.listdir(tmp_path / "out") == ["overlay.mp4"]  # No partial file left.

  capture = cv2.VideoCapture(video)
  read = cv2.VideoCapture(out)
  assert read.get(cv2.CAP_PROP_FRAME_COUNT) == 7 and read.get(cv2.CAP_PROP_FPS) == 10.0
  predictor = predict.ArtifactPredictor(path)
  for _ in range(7):
    (_, frame_in), (ok, frame_out) = capture.read(), read.read()
    assert ok and frame_out.shape == (96, 160, 3)
    image = cv2.cvtColor(frame_in, cv2.COLOR_BGR2RGB)
    labels = predictor(image[None], (96, 160))[0]
    want = (image.astype(np.float32) + predictor.palette[labels]) / 2
    got = cv2.cvtColor(frame_out, cv2.COLOR_BGR2RGB).astype(np.float32)
    # mp4v is lossy (measured: 6.3 of 255 on average); the frame itself is 4x farther.
    assert np.mean(np.abs(got - want)) < 10 < 0.5 * np.mean(np.abs(got - image)), \
        "not the overlay of the predicted classes"


def test_a_video_that_cannot_be_read_is_a_clear_error(cityscapes_run, tmp_path):
  (tmp_path / "broken.mp4").write_bytes(b"not a video")
  predictor = predict.CheckpointPredictor(_config(), cityscapes_run)
  with pytest.raises(predict.data.DataError, match=r"--video=.*broken.mp4: cannot be opened"):
    predict.predict_video(predictor, str(tmp_path / "broken.mp4"), str(tmp_path / "o.mp4"))
  assert sorted(os.listdir(tmp_path)) == ["broken.mp4"]
