"""The CPU-tuned kernels stay on the CPU: a GPU compile gets lax's convolutions in the compute dtype.

No GPU is needed: the main job's training step is lowered for CUDA
(`lowering_platforms=("cuda",)`) and its StableHLO read.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import adapt
from segjax import evaluation, methods, parallel, platforms
from segjax import states as states_lib
from segjax.models import fast_ops

import uda_testing  # pylint: disable=wrong-import-order

NUM_CLASSES = 8
_CONV = re.compile(r"stablehlo\.convolution\((.*)\) -> (tensor<[^>]*>)")


def _main_job_bf16():
  config = adapt.get_config()
  config.model.dtype = config.disc.dtype = "bfloat16"
  return config


def _lowered_train_step(config, platform: str) -> str:
  """The StableHLO of the main job's data-parallel training step, traced and lowered for
  `platform`."""
  mesh = parallel.make_mesh()
  with platforms.compiling_for(platform):
    method = methods.build(config, NUM_CLASSES)
    init_seg, _ = states_lib.segmenter_init(config, jax.random.key(0), NUM_CLASSES)
    states = {name: states_lib.abstract_replicated(init, mesh)
              for name, init in method.state_inits(jax.random.key(1), init_seg).items()}
    batch = uda_testing.random_batch(config, n=jax.device_count())
    step = parallel.data_parallel(functools.partial(method.step, axis_name=parallel.DATA_AXIS),
                                  mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()),
                                  out_specs=(P(), P()), donate_argnums=(0,))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    traced = step.trace(states, parallel.global_batch_spec(batch, mesh), rng)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def _ops(text: str) -> collections.Counter:
  return collections.Counter(re.findall(r"stablehlo\.(\w+)", text))


def _convolution_types(text: str) -> list[str]:
  """Each convolution's operand and result types, e.g. 'tensor<1x64x128x3xbf16>, ...'."""
  types = []
  for line in text.splitlines():
    if "stablehlo.convolution" in line:
      types.append(line.rsplit(" : ", 1)[-1])
  return types


def test_cpu_kernels_follow_the_compile_platform():
  assert platforms.compile_platform() == jax.default_backend() == "cpu"
  assert platforms.cpu_kernels()
  with platforms.compiling_for("cuda"):
    assert platforms.compile_platform() == "cuda" and not platforms.cpu_kernels()
    with platforms.compiling_for("cpu"):
      assert platforms.cpu_kernels()
    assert not platforms.cpu_kernels()
  assert platforms.cpu_kernels()


def test_main_job_step_lowered_for_cuda_uses_single_bf16_convolutions():
  config = _main_job_bf16()
  cuda = _lowered_train_step(config, "cuda")
  cpu = _lowered_train_step(config, "cpu")
  cuda_ops, cpu_ops = _ops(cuda), _ops(cpu)
  conv_types = _convolution_types(cuda)
  assert conv_types
  # Every convolution (forward, input and kernel gradients, of the segmenter and the
  # discriminator) is one bf16 op: no float32 upcast around it, no taps or rows products.
  not_bf16 = [t for t in conv_types if re.search(r"x(f32|f16|f64)>", t)]
  assert not not_bf16, not_bf16[:3]
  assert all(t.count("bf16") == 3 for t in conv_types), conv_types[:3]
  # The CPU compile of the same step replaces many convolutions by matrix products (taps),
  # so the comparison below would notice the GPU getting them.
  assert cpu_ops["convolution"] < cuda_ops["convolution"]
  assert cpu_ops["dot_general"] > cuda_ops["dot_general"]


def test_gpu_forward_has_one_convolution_per_layer():
  """Inference lowered for CUDA: exactly one convolution per Conv layer (none split into taps,
  none with dead taps cropped away), in bf16."""
  config = _main_job_bf16()
  mesh = parallel.make_mesh()
  with platforms.compiling_for("cuda"):
    seg_state = states_lib.abstract_seg_state(config, NUM_CLASSES, mesh)
    eval_step = evaluation.make_eval_step(config, NUM_CLASSES, mesh)
    h, w = config.data.crop_size
    n = jax.device_count()
    batch = {"image": jax.ShapeDtypeStruct((n, h, w, 3), np.uint8,
                                           sharding=parallel.batch_sharded(mesh)),
             "label": jax.ShapeDtypeStruct((n, h, w), np.uint8,
                                           sharding=parallel.batch_sharded(mesh))}
    text = eval_step.trace(seg_state, batch, evaluation.confusion_spec(NUM_CLASSES, mesh)).lower(
        lowering_platforms=("cuda",)).as_text()
  kernels = [x for x in jax.tree.leaves(seg_state.params) if x.ndim == 4]
  conv_types = _convolution_types(text)
  assert len(conv_types) == len(kernels)
  assert all(t.count("bf16") == 3 for t in conv_types), conv_types[:3]


def test_max_pool_on_gpu_is_lax_reduce_window():
  x = jax.ShapeDtypeStruct((2, 9, 11, 4), np.dtype("bfloat16"))
  pool = lambda x: fast_ops.max_pool(x, 3, 2, ((1, 1), (1, 1))).astype(np.float32).sum()
  lowered = lambda platform: jax.jit(jax.value_and_grad(pool)).trace(x).lower(
      lowering_platforms=(platform,)).as_text()
  with platforms.compiling_for("cuda"):
    cuda = lowered("cuda")
  cpu = lowered("cpu")
  assert _ops(cuda)["reduce_window"] == 1 and _ops(cuda)["select_and_scatter"] == 1
  assert _ops(cpu)["select_and_scatter"] == 0  # The CPU's scatter-free gradient.


def test_run_once_initialisers_compile_unoptimised_on_the_cpu_only():
  """parallel.make_replicated's compile options: -O0 for XLA:CPU, the defaults elsewhere."""
  assert parallel.init_compiler_options() == parallel.CPU_INIT_COMPILER_OPTIONS
  with platforms.compiling_for("cuda"):
    assert parallel.init_compiler_options() is None


@pytest.mark.parametrize("name,expected,grouped_expected", [
    ("daformer_mitb0", 79, 22),
    ("hrda_mitb0", 166, 44),  # Two passes of the segmenter, the scale attention's 1x1 convs.
])
def test_mit_segmenter_lowered_for_cuda_keeps_grouped_bf16_convolutions(name, expected,
                                                                          grouped_expected):
  """DAFormer's and HRDA's MiT-B0 training gradients for a GPU: the depthwise convolutions
  (Mix-FFN, the head's separable ASPP) stay single grouped convolutions (the CPU's shifted
  products are not used), every convolution in bf16 with model.dtype=bfloat16."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from segjax import models  # pylint: disable=import-outside-toplevel
  model = models.build_segmenter(ml_collections.ConfigDict(
      {"name": name, "dtype": "bfloat16", "param_dtype": "float32", "detail_crop": (32, 32)}), 19)
  images = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)

  def loss(params, stats, images):
    out, _ = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return out["logits"].mean() + out.get("detail_logits", out["logits"]).mean()

  with platforms.compiling_for("cuda"):
    text = jax.jit(jax.grad(loss)).trace(variables["params"], variables["batch_stats"],
                                         images).lower(lowering_platforms=("cuda",)).as_text()
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  grouped = [line for line in convolutions if "feature_group_count = 1 " not in line]
  assert len(convolutions) == expected and len(grouped) == grouped_expected
  assert all("bf16" in line for line in convolutions)
