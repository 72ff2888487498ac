"""VGG16 with fc6/fc7 as convolutions: the fully-convolutional trunk of FCN.

Layer names follow the FCN paper (conv1_1 ... conv5_3, fc6, fc7); `torch_key`
maps them to torchvision's `vgg16` state-dict keys (`features.0` ...
`classifier.3`), whose fc6 matrix (4096 x 25088) is reshaped into the 7x7
convolution it is.

`conv1_padding` 100 with ceil-mode pooling and an unpadded fc6 is the
reference FCN (shelhamer/fcn.berkeleyvision.org): it makes any input size
work, and the heads crop back to it. `conv1_padding` 1 with fc6 padded by 3
is the 'aligned' variant (used by the PyTorch peer benchmark), cheaper by the
100-pixel margin.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# Our layer name -> torchvision vgg16 module.
TORCH_NAMES = {}
_index = 0
for _stage, _widths in enumerate(STAGES, start=1):
  for _j in range(len(_widths)):
    TORCH_NAMES[f"conv{_stage}_{_j + 1}"] = f"features.{_index}"
    _index += 2  # conv, ReLU
  _index += 1  # max pool
TORCH_NAMES.update(fc6="classifier.0", fc7="classifier.3")


class VGG16(nn.Module):
  """Returns {'pool3', 'pool4', 'pool5', 'fc7'} features (NHWC, compute dtype).

  Strides 8, 16, 32, 32 (the reference FCN's fc7 is offset by its padding).
  Dropout(0.5) follows fc6 and fc7 in training, as in the reference.
  """
  conv1_padding: int = 100
  dropout_rate: float = 0.5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  channels = {"pool3": 256, "pool4": 512, "pool5": 512, "fc7": 4096}

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict[str, jax.Array]:
    conv = lambda *a, **k: layers.conv(*a, use_bias=True, dtype=self.dtype,
                                       param_dtype=self.param_dtype, **k)
    x = x.astype(self.dtype)
    features = {}
    for stage, widths in enumerate(STAGES, start=1):
      for j, width in enumerate(widths, start=1):
        pad = self.conv1_padding if (stage, j) == (1, 1) else 1
        x = nn.relu(conv(width, 3, 1, pad, name=f"conv{stage}_{j}")(x))
      x = layers.max_pool(x, 2, 2, ceil_mode=True)
      features[f"pool{stage}"] = x
    fc6_pad = 0 if self.conv1_padding == 100 else 3
    x = nn.relu(conv(4096, 7, 1, fc6_pad, name="fc6")(x))
    x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(conv(4096, 1, name="fc7")(x))
    x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    features["fc7"] = x
    del features["pool1"], features["pool2"]
    return features

  @staticmethod
  def torch_key(path: tuple[str, ...]) -> str:
    module, leaf = path
    return f"{TORCH_NAMES[module]}.{layers.TORCH_LEAF_NAMES[leaf]}"
