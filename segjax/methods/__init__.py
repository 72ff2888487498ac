"""Adaptation methods, selected by `adapt.method`: each is a pure, per-device step over its states.

A method is built from the config (`build`) and provides:
  * `state_inits(rng, seg_init)`: the functions creating its TrainStates, by
    name ('seg' is always the segmenter, the network evaluated), and their
    learning-rate schedules (`schedules`);
  * `step(states, batch, rng, *, axis_name)`: one training iteration in the
    pmap programming model (explicit collectives over `axis_name`), returning
    the new states and scalar metrics (logged as train/<name>);
  * `uses_target` (the batch holds target images) and `target_labels` (and
    target labels: pseudo labels read from disk).

  source_only    the segmenter on source labels only (the lower bound)
  adaptsegnet    output-space adversarial (Tsai et al. 2018), single- or multi-level
  advent         AdvEnt and/or MinEnt (Vu et al. 2019)
  fcn_wild       FCNs in the Wild: fc7 domain classifier + category size constraints
  mpl            Meta Pseudo Labels: a teacher taught by the student's feedback
  self_training  EMA teacher, confidence-weighted pseudo labels, ClassMix (DACS/DAFormer)
  pseudo_label   offline pseudo labels (median / CBST thresholds) + adversarial (the seed, BDL)
"""

import importlib

import ml_collections

# name -> "module:Class", imported on first use.
METHODS = {
    "source_only": "segjax.methods.supervised:SourceOnly",
    "adaptsegnet": "segjax.methods.output_space:OutputSpace",
    "advent": "segjax.methods.output_space:OutputSpace",
    "fcn_wild": "segjax.methods.fcn_wild:FcnWild",
    "mpl": "segjax.methods.mpl:MetaPseudoLabels",
    "pseudo_label": "segjax.methods.pseudo_label:PseudoLabel",
    "self_training": "segjax.methods.self_training:SelfTraining",
}


def method_class(name: str):
  if name not in METHODS:
    raise ValueError(f"Unknown adaptation method {name!r} (config field adapt.method); "
                     f"expected one of {sorted(METHODS)}.")
  module, cls = METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def build(config: ml_collections.ConfigDict, num_classes: int):
  """The method of `config.adapt.method`, with its hyperparameters checked."""
  return method_class(config.adapt.method)(config, num_classes)
