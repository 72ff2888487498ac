"""Converts a PyTorch state dict to .safetensors (or .npz), so loading it needs no torch.

  python -m segjax.tools.convert_weights --input=resnet101.pth --output=resnet101.safetensors

Run it once where torch is installed, then point `model.backbone_weights` at
the output. The keys stay torchvision's: the file is read by
`segjax.models.weights.read_state_dict`, which unwraps a 'state_dict' or
'model' entry, drops 'module.' prefixes and stores floating tensors as
float32. DeepLab's Caffe-converted init files (AdaptSegNet's
`DeepLab_resnet_pretrained_init-f81d91e8.pth`, ADVENT's
`DeepLab_resnet_pretrained_imagenet.pth`) keep their 'Scale.' keys, by which
the loader tells their layout from torchvision's; the layout found is
printed, so that model.resnet_style can be set to match. The output is
written to a temporary file in its own folder and then
renamed over the target, so an interrupted run never leaves a partial file
under the output's name.
"""

import os
import tempfile

import numpy as np
from absl import app, flags

from segjax import cli, errors
from segjax.models import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "State dict to read: .pth/.pt (PyTorch), .safetensors or .npz.")
flags.DEFINE_string("output", None, "File to write: .safetensors or .npz.")
flags.mark_flags_as_required(["input", "output"])

OUTPUT_FORMATS = (".safetensors", ".npz")


def convert_file(input_path: str, output_path: str) -> tuple[int, int]:
  """Writes the state dict at `input_path` to `output_path`.

  Returns:
    The number of tensors written and their total size in bytes.
  """
  ext = os.path.splitext(output_path)[1].lower()
  if ext not in OUTPUT_FORMATS:
    raise errors.ConfigError(f"--output={output_path!r} has extension {ext!r}; expected "
                             f"{' or '.join(OUTPUT_FORMATS)}.")
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"--input={input_path!r} does not exist.")
  folder = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"The folder of --output={output_path!r} does not exist.")
  # C order, as safetensors needs; not np.ascontiguousarray, which makes 0-d tensors 1-d.
  tensors = {k: np.asarray(v, order="C") for k, v in weights.read_state_dict(input_path).items()}
  fd, temp_path = tempfile.mkstemp(suffix=ext, prefix=".convert_weights-", dir=folder)
  os.close(fd)
  try:
    _write(tensors, temp_path)
    with open(temp_path, "rb+") as f:
      os.fsync(f.fileno())  # On disk before the rename makes it visible.
    os.replace(temp_path, output_path)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)
  return len(tensors), sum(v.nbytes for v in tensors.values())


def _write(tensors: dict[str, np.ndarray], path: str) -> None:
  if path.endswith(".npz"):
    with open(path, "wb") as f:  # A file object: np.savez would not append a suffix.
      np.savez(f, **tensors)
  else:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(tensors, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    count, size = convert_file(FLAGS.input, FLAGS.output)
  except (FileNotFoundError, ValueError, ImportError) as e:
    raise app.UsageError(str(e)) from e
  print(f"Wrote {count} tensors ({size / 2**20:.1f} MiB) from {FLAGS.input} to {FLAGS.output}.")
  layout = weights.file_layout(FLAGS.output)
  print(f"Layout {layout!r}: {weights.LAYOUTS[layout]}.")


if __name__ == "__main__":
  cli.run(main)
