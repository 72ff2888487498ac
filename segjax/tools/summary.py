"""Model summary: parameters, FLOPs and forward latency of a config's networks.

  python -m segjax.tools.summary --config=configs/bisenet_gta5_cityscapes.py \
      --height=512 --width=1024 --batch=1

For the segmenter (and the discriminator of an adversarial method) it prints
the parameter count, the FLOPs of one forward pass from XLA's cost analysis
of the compiled program (a multiply-add counts as 2 FLOPs, and taps that fall
on zero padding are not counted; `thop` reports MACs, about half of that),
the FLOPs and memory (XLA's memory analysis: arguments, outputs and
temporaries) of the segmenter's gradient on a batch, and the median forward
latency on this machine in the config's `model.dtype`. The JAX answer to the
seeds' `thop` numbers; `--config.model.remat=True` (MiT) and
`--config.model.dtype=bfloat16` show what they save.

With `--step`, also the config's whole training step as `segjax.main` compiles
it on one device, at `--batch` source (+ target) images of the given size:
every state the method keeps (optimizer moments, EMA teacher, frozen
encoder...), every network pass of the step and `optim.accumulate_steps`.
It is traced as a GPU traces it (lax's convolutions; `--step_for=cpu`: with
the CPU-only formulations) and compiled by this machine's XLA; its memory is
XLA's memory analysis of that program, less the donated states it updates in
place: the figure to set against a GPU's memory, though XLA:GPU's fusion and
scheduling differ from the CPU's. For example,
DAFormer's published step (MiT-B5, 512x512, 2 + 2 images; the feature
distance is on when `model.backbone_weights` is set, which is not read here):

  python -m segjax.tools.summary --config=configs/daformer.py --step \
      --config.model.name=daformer_mitb5 --config.model.backbone_weights=mit_b5.pth \
      --height=512 --width=512 --batch=2 --repeats=1
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jax.sharding import Mesh

from segjax import cli, errors, losses, methods, models, parallel, platforms
from segjax import states as states_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
flags.DEFINE_integer("height", None, "Input height (default: the config's data.crop_size).")
flags.DEFINE_integer("width", None, "Input width (default: the config's data.crop_size).")
flags.DEFINE_integer("batch", 1, "Images per forward pass.")
flags.DEFINE_integer("num_classes", 19, "Output classes (19: Cityscapes' train ids).")
flags.DEFINE_integer("repeats", 10, "Timed forward passes (after 2 warm-ups).")
flags.DEFINE_bool("step", False, "Also the whole training step's FLOPs and memory.")
flags.DEFINE_enum("step_for", "cuda", ["cuda", "cpu"],
                  "--step: trace the step as a GPU does (lax's convolutions) or with the "
                  "CPU-only formulations of segjax.models.fast_ops.")
flags.mark_flags_as_required(["config"])


def compiled_flops(fn, *args) -> float:
  """FLOPs of `fn(*args)` according to XLA's cost analysis of the compiled program."""
  return compiled_costs(fn, *args)[0]


def compiled_costs(fn, *args) -> tuple[float, int]:
  """(FLOPs, bytes) of the compiled `fn(*args)`: XLA's cost analysis, and its memory analysis
  (arguments, outputs and temporaries, less the outputs that alias arguments)."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # Older jax returned one dict per device program.
    analysis = analysis[0]
  memory = compiled.memory_analysis()
  used = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes) if memory else -1
  return float(analysis.get("flops", float("nan"))), int(used)


def median_latency(fn, args, repeats: int) -> float:
  """Median seconds of `fn(*args)` (compiled), after two warm-up calls."""
  fn = jax.jit(fn)
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def summarize(config, height: int, width: int, batch: int, num_classes: int,
              repeats: int) -> list[dict]:
  """One record per network: name, params, forward and train-step FLOPs, latency."""
  images = jnp.zeros((batch, height, width, 3), jnp.float32)
  seg = models.build_segmenter(config.model, num_classes)
  variables = jax.jit(lambda: seg.init(jax.random.key(0), images[:1], train=False))()
  params, stats = variables["params"], variables.get("batch_stats", {})
  forward = lambda p, s, x: seg.apply({"params": p, "batch_stats": s}, x, train=False)["logits"]
  seg_loss = losses.from_config(config.loss)
  labels = jnp.zeros((batch, height, width), jnp.int32)

  def train_loss(p, s, x):
    outputs, _ = seg.apply({"params": p, "batch_stats": s}, x, train=True,
                           rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    heads = (outputs["logits"], *outputs["aux"])
    return sum(losses.global_mean(*seg_loss(h, labels), None) for h in heads)

  train_flops, train_bytes = compiled_costs(jax.grad(train_loss), params, stats, images)
  records = [{
      "network": f"model: {config.model.name}", "params": count(params),
      "forward_flops": compiled_flops(forward, params, stats, images),
      "train_flops": train_flops, "train_bytes": train_bytes,
      "latency_s": median_latency(forward, (params, stats, images), repeats)}]
  if getattr(methods.build(config, num_classes), "disc_names", None):
    disc = models.build_discriminator(config.disc, num_classes)
    probs = jnp.zeros((batch, height, width, num_classes), jnp.float32)
    disc_params = jax.jit(lambda: disc.init(jax.random.key(0), probs[:1]))()["params"]
    disc_forward = lambda p, x: disc.apply({"params": p}, x)
    disc_flops, disc_bytes = compiled_costs(
        jax.grad(lambda p, x: jnp.mean(disc_forward(p, x))), disc_params, probs)
    records.append({
        "network": f"disc: {config.disc.name}", "params": count(disc_params),
        "forward_flops": compiled_flops(disc_forward, disc_params, probs),
        "train_flops": disc_flops, "train_bytes": disc_bytes,
        "latency_s": median_latency(disc_forward, (disc_params, probs), repeats)})
  return records


def step_costs(config, height: int, width: int, batch: int, num_classes: int,
               trace_for: str = "cuda", with_memory: bool = True) -> dict:
  """FLOPs and bytes of the config's training step as `segjax.train` builds it on one device,
  for `batch` images of height x width per domain, traced for `trace_for`
  (`segjax.platforms`): the FLOPs from XLA's cost analysis of the traced program, the bytes
  from its memory analysis compiled by this machine's backend (see `compiled_costs`; without
  `with_memory` nothing is compiled and the bytes are -1)."""
  with platforms.compiling_for(trace_for):
    return _step_costs(config, height, width, batch, num_classes, trace_for, with_memory)


def _step_costs(config, height, width, batch, num_classes, trace_for, with_memory):
  config = config.copy_and_resolve_references()
  config.data.crop_size = (height, width)
  config.batch_size = batch
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))

  def lower(config):
    method = methods.build(config, num_classes)
    seg_rng, other_rng = jax.random.split(jax.random.key(0))
    init_seg, _ = states_lib.segmenter_init(config, seg_rng, num_classes)
    states = {name: states_lib.abstract_replicated(init, mesh)
              for name, init in method.state_inits(other_rng, init_seg).items()}
    sharding = parallel.batch_sharded(mesh)
    spec = lambda *shape: jax.ShapeDtypeStruct((batch, height, width, *shape), jnp.uint8,
                                               sharding=sharding)
    domain = lambda labels: {"image": spec(3), **({"label": spec()} if labels else {})}
    batch_spec = {"source": domain(True)}
    if method.uses_target:
      batch_spec["target"] = domain(method.target_labels)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    return parallel.train_step(method.step, mesh).lower(states, batch_spec, rng)

  lowered = lower(config)
  used = -1
  if with_memory:
    memory = lowered.compile().memory_analysis()
    used = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes) if memory else -1
  # Cost analysis counts a loop's body once: the FLOPs are those of the same step without its
  # loops, the whole batch in one pass (which accumulation computes too) and unrolled blocks.
  if config.optim.get("accumulate_steps", 1) > 1 or config.model.get("scan_blocks", False):
    config.optim.accumulate_steps = 1
    if "scan_blocks" in config.model:
      config.model.scan_blocks = False
    lowered = lower(config)
  # The program as traced, before XLA:CPU rewrites it: the CPU expands a grouped convolution's
  # kernel gradient into a dense one (30x the FLOPs of a depthwise 3x3's), which a GPU does not.
  flops = float(lowered.cost_analysis()["flops"])
  return {"method": config.adapt.method, "step_flops": flops, "step_bytes": used,
          "trace_for": trace_for}


def format_step(record: dict, height: int, width: int, batch: int, config) -> str:
  both = f"{batch} + {batch}" if record["method"] != "source_only" else f"{batch}"
  return (f"Training step of adapt.method={record['method']} ({both} images of {height}x{width}, "
          f"model.dtype {config.model.dtype}, model.remat {config.model.get('remat', False)}, "
          f"model.scan_blocks {config.model.get('scan_blocks', False)}, "
          f"optim.accumulate_steps {config.optim.get('accumulate_steps', 1)}): "
          f"{record['step_flops'] / 1e9:.1f} GFLOPs, {record['step_bytes'] / 2 ** 30:.2f} GiB "
          f"(traced for {record['trace_for']}, compiled and analysed by XLA:"
          f"{jax.devices()[0].platform.upper()}: states, batch, temporaries; the updated states "
          f"reuse their buffers)")


def format_table(records: list[dict], height: int, width: int, batch: int, dtype: str) -> str:
  lines = [f"Input {batch}x{height}x{width}x3, compute dtype {dtype}, "
           f"{jax.devices()[0].platform.upper()} ({jax.device_count()} device(s))",
           f"{'network':32s} {'params':>14s} {'fwd GFLOPs':>11s} {'train GFLOPs':>13s} "
           f"{'train MiB':>10s} {'fwd ms':>9s}"]
  for r in records:
    lines.append(f"{r['network']:32s} {r['params']:>14,d} {r['forward_flops'] / 1e9:>11.2f} "
                 f"{r['train_flops'] / 1e9:>13.2f} {r['train_bytes'] / 2 ** 20:>10.1f} "
                 f"{r['latency_s'] * 1e3:>9.1f}")
  lines.append("FLOPs from XLA's cost analysis (multiply-add = 2 FLOPs; thop's MACs are half); "
               "train = forward + backward of the segmentation loss; train MiB: XLA's memory "
               "analysis of that program compiled for this backend (parameters, gradients and "
               "activations kept for the backward pass; no optimizer state).")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  with errors.config_checks():
    models.build_segmenter(config.model, FLAGS.num_classes)
  height = FLAGS.height or config.data.crop_size[0]
  width = FLAGS.width or config.data.crop_size[1]
  records = summarize(config, height, width, FLAGS.batch, FLAGS.num_classes, FLAGS.repeats)
  print(format_table(records, height, width, FLAGS.batch, config.model.dtype))
  if FLAGS.step:
    print(format_step(step_costs(config, height, width, FLAGS.batch, FLAGS.num_classes,
                                 FLAGS.step_for), height, width, FLAGS.batch, config))


if __name__ == "__main__":
  cli.run(main)
