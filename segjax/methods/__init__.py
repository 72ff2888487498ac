"""Adaptation methods, selected by `adapt.method`: each is a pure, per-device step over its states.

A method is built from the config (`build`) and provides:
  * `state_inits(rng, seg_init)`: the functions creating its TrainStates, by
    name ('seg' is always the segmenter, the network evaluated), and their
    learning-rate schedules (`schedules`);
  * `step(states, batch, rng, *, axis_name)`: one training iteration in the
    pmap programming model (explicit collectives over `axis_name`), returning
    the new states and scalar metrics (logged as train/<name>);
  * `uses_target` (the batch holds target images) and `target_labels` (and
    target labels: pseudo labels read from disk);
  * `adapt_fields`: the fields of config.adapt it reads, with their defaults.
    config.adapt holds `method` and exactly these (`adapt_config` builds it,
    `check_adapt` refuses anything else at start-up), so that a
    hyperparameter cannot be set for a method that ignores it.

  source_only    the segmenter on source labels only (the lower bound)
  adaptsegnet    output-space adversarial (Tsai et al. 2018), single- or multi-level
  advent         AdvEnt and/or MinEnt (Vu et al. 2019)
  fcn_wild       FCNs in the Wild: fc7 domain classifier + category size constraints
  mpl            Meta Pseudo Labels: a teacher taught by the student's feedback
  self_training  EMA teacher, confidence-weighted pseudo labels, ClassMix (DACS)
  daformer       self_training + ImageNet feature distance, DAFormer's defaults (Hoyer 2022)
  hrda           daformer at two resolutions with a scale attention (Hoyer 2022b)
  vfm_uda        daformer's self-training of a DINOv2 ViT with token masking (Englert 2024)
  vfm_uda_pp     vfm_uda on a ViT-Adapter, block masking, feature distance to a frozen DINOv2
  pseudo_label   offline pseudo labels (median / CBST thresholds) + adversarial (the seed, BDL)
"""

import importlib

import ml_collections

from segjax import errors

# name -> "module:Class", imported on first use.
METHODS = {
    "source_only": "segjax.methods.supervised:SourceOnly",
    "adaptsegnet": "segjax.methods.output_space:OutputSpace",
    "advent": "segjax.methods.output_space:OutputSpace",
    "fcn_wild": "segjax.methods.fcn_wild:FcnWild",
    "mpl": "segjax.methods.mpl:MetaPseudoLabels",
    "pseudo_label": "segjax.methods.pseudo_label:PseudoLabel",
    "self_training": "segjax.methods.self_training:SelfTraining",
    "daformer": "segjax.methods.daformer:DAFormer",
    "hrda": "segjax.methods.daformer:HRDA",
    "vfm_uda": "segjax.methods.daformer:VFMUDA",
    "vfm_uda_pp": "segjax.methods.daformer:VFMUDAPlusPlus",
}


def method_class(name: str):
  if name not in METHODS:
    raise ValueError(f"Unknown adaptation method {name!r} (config field adapt.method); "
                     f"expected one of {sorted(METHODS)}.")
  module, cls = METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def adapt_config(name: str, **values) -> ml_collections.ConfigDict:
  """config.adapt for the method `name`: `method` and that method's fields, at their defaults
  but for `values`; a ConfigError names a value that is not one of its fields."""
  fields = method_class(name).adapt_fields
  unknown = [field for field in values if field not in fields]
  if unknown:
    raise errors.ConfigError(f"adapt_config({name!r}): {', '.join(unknown)} is not a field of "
                             f"{name}; its fields are {_listed(fields)}.")
  adapt = ml_collections.ConfigDict({"method": name, **fields})
  adapt.update(values)  # Each field keeps its default's type: 0 for a float field is 0.0.
  return adapt


def fields_of(name: str, adapt: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields of the method `name` as it reads them: `adapt`'s value of each, the default of
  those `adapt` lacks; `adapt`'s other fields are left out.

  Only code that sets up a method without the start-up checks (a benchmark,
  the pseudo-label thresholds read from another method's config) meets such
  an `adapt`: `check_adapt` refuses it in every run.
  """
  fields = method_class(name).adapt_fields
  return adapt_config(name, **{field: adapt[field] for field in fields if field in adapt})


def check_adapt(adapt: ml_collections.ConfigDict) -> None:
  """A ConfigError unless config.adapt holds adapt.method and exactly that method's fields.

  A field the method does not read would be ignored without a word (another
  method's hyperparameter, left from a config built for it); a field it
  lacks would take a default that the run's config.json does not record.
  """
  name = adapt.method
  fields = method_class(name).adapt_fields
  foreign = [field for field in adapt if field != "method" and field not in fields]
  missing = [field for field in fields if field not in adapt]
  problems = []
  if foreign:
    problems.append(f"config.adapt.{', config.adapt.'.join(foreign)}: adapt.method={name!r} "
                    f"does not read {'it' if len(foreign) == 1 else 'them'}")
  if missing:
    problems.append(f"config.adapt lacks {', '.join(missing)}, which adapt.method={name!r} reads")
  if problems:
    raise errors.ConfigError(
        f"{'; '.join(problems)}. The fields of {name} are {_listed(fields)}, and config.adapt "
        f"must hold them and no others: use a config built for {name} (configs/{name}.py), or "
        f"build config.adapt with segjax.methods.adapt_config({name!r}, FIELD=VALUE, ...).")


def _listed(fields: dict) -> str:
  return ", ".join(fields) if fields else "none"


def build(config: ml_collections.ConfigDict, num_classes: int):
  """The method of `config.adapt.method`, with its hyperparameters checked."""
  return method_class(config.adapt.method)(config, num_classes)
