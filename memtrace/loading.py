"""Builds the model a command line names: a factory in a module or a file, or a Hugging Face model from its
configuration alone (no weights are downloaded). Models are built on the meta device where the factory
allows it, so that a 70B configuration costs no memory.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# --task choices -> the Auto class that builds that head from a configuration
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}


class ModelSpecError(ValueError):
    """MODEL is not written as any of the accepted forms (a usage error)."""


class ModelBuildError(RuntimeError):
    """MODEL is well formed but importing or calling it failed, or it did not return an nn.Module."""


@dataclass(frozen=True)
class BuiltModel:
    module: torch.nn.Module
    spec: str
    on_meta: bool  # built on the meta device (no memory of its size allocated)
    task: str | None = None  # the Hugging Face task, for models built from a configuration
    note: str | None = None  # why it was built on the CPU instead, if it was


def build_model(spec: str, kwargs: dict[str, Any] | None = None, task: str | None = None) -> BuiltModel:
    """``pkg.module:factory``, ``path/file.py:factory``, ``hf:ConfigClass``, or a ``config.json`` or model
    directory; ``kwargs`` go to the factory or override the configuration."""
    kwargs = dict(kwargs or {})
    if task is not None and task not in TASKS:
        raise ModelSpecError(f"--task {task!r} is unknown; valid: {', '.join(TASKS)}")
    if spec.startswith("hf:"):
        return _build_hf(spec, _hf_config_class(spec[3:]), kwargs, task)
    path = Path(spec)
    if path.name == "config.json" or path.is_dir():
        return _build_hf(spec, _local_config(path), kwargs, task)
    if task is not None:
        raise ModelSpecError(f"--task is for Hugging Face models (hf:ConfigClass or a config.json); got {spec!r}")
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ModelSpecError(
            f"cannot read MODEL {spec!r}: write package.module:factory, path/to/file.py:factory, "
            "hf:ConfigClass (e.g. hf:LlamaConfig) or the path of a config.json or model directory")
    with _neighbours_importable(target):  # while the file is imported and its factory runs
        factory = _resolve(_import_target(target), name, spec)
        if not callable(factory):
            raise ModelBuildError(f"{spec} is a {type(factory).__name__}, not a callable that returns an nn.Module")
        return _call_on_meta(lambda: factory(**kwargs), spec, task=None)


@contextlib.contextmanager
def _neighbours_importable(target: str):
    """A factory file may import the modules beside it, at import time or when called."""
    if not target.endswith(".py"):
        yield
        return
    folder = str(Path(target).resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _import_target(target: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelBuildError(f"no such file: {target}")
        name = f"memtrace_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelBuildError(f"importing {target} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise ModelBuildError(f"cannot import {target}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _resolve(module, name: str, spec: str):
    obj = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelBuildError(f"{module.__name__ if obj is module else spec} has no attribute {part!r}") from None
    return obj


def _call_on_meta(build, spec: str, task: str | None) -> BuiltModel:
    """Build under ``torch.device("meta")``; a factory that needs real values at construction (e.g. a
    ``.tolist()`` of an initial tensor) is built again on the CPU, and the report says so."""
    try:
        with torch.device("meta"):
            model = build()
        on_meta, note = True, None
    except ModelBuildError:
        raise
    except Exception as meta_exc:
        try:
            model = build()
        except Exception as exc:
            raise ModelBuildError(f"building {spec} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        on_meta = False
        note = (f"{spec} cannot be built on the meta device ({type(meta_exc).__name__}: "
                f"{_first_line(meta_exc)}); built on the CPU instead")
    if not isinstance(model, torch.nn.Module):
        raise ModelBuildError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return BuiltModel(model, spec, on_meta, task, note)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelBuildError("Hugging Face models need the transformers package: pip install transformers") from None
    return transformers


def _hf_config_class(name: str):
    transformers = _transformers()
    cls = getattr(transformers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, transformers.PretrainedConfig)):
        hint = f"; did you mean {name}Config?" if hasattr(transformers, f"{name}Config") else ""
        raise ModelBuildError(f"hf:{name} is not a transformers configuration class (e.g. hf:LlamaConfig){hint}")
    return cls


def _local_config(path: Path):
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelBuildError(f"no config.json in {path}")
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelBuildError(f"cannot read {file}: {_first_line(exc)}") from exc
    transformers = _transformers()
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelBuildError(f"{file} has no model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise ModelBuildError(f"{file}: {_first_line(exc)}") from exc
    return lambda **overrides: type(config).from_dict({**values, **overrides})


def default_task(config) -> str:
    """The head a configuration is built with when --task is not given: its ``architectures`` entry if it
    names one, else the family's language-model head (masked for encoders), its image classifier, or the
    base model."""
    from transformers.models.auto import modeling_auto

    for arch in getattr(config, "architectures", None) or ():
        for task, mapping in (("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                              ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                              ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                              ("classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                              ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")):
            if arch in _names(getattr(modeling_auto, mapping).values()):
                return task
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False) and model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    # encoders (BERT, RoBERTa, ...) also have a causal head, for use as decoders only
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked-lm"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if model_type in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image-classification"
    return "base"


def _names(values) -> set[str]:
    out = set()
    for v in values:
        out.update(v if isinstance(v, (tuple, list)) else (v,))
    return out


def _check_fields(spec: str, base, overrides: dict[str, Any]) -> None:
    """A configuration class takes any keyword and keeps it as an attribute that the model never reads, so a
    misspelt field would silently build the default-size model: refuse fields the class does not have."""
    import difflib

    known = set(base.to_dict()) | set(getattr(type(base), "attribute_map", {}))
    for cls in type(base).__mro__:
        if "__init__" in vars(cls):
            known |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    # a private attribute of the same name: a keyword the base class takes (attn_implementation)
    unknown = [k for k in overrides if k not in known and not hasattr(base, k) and not hasattr(base, "_" + k)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ModelSpecError(f"--model-kwargs field {unknown[0]!r} is not a field of {type(base).__name__} ({spec})"
                             f"{hint}")


def _build_hf(spec: str, make_config, overrides: dict[str, Any], task: str | None) -> BuiltModel:
    transformers = _transformers()
    try:
        with quiet_transformers():
            base = make_config()
    except Exception as exc:
        raise ModelBuildError(f"{spec}: bad configuration: {type(exc).__name__}: {_first_line(exc)}") from exc
    _check_fields(spec, base, overrides)
    try:
        with quiet_transformers():
            config = make_config(**overrides)
    except Exception as exc:
        raise ModelBuildError(f"{spec}: bad configuration: {type(exc).__name__}: {_first_line(exc)}") from exc
    task = task or default_task(config)
    auto = getattr(transformers, TASKS[task])

    def build():
        with quiet_transformers():
            try:
                return auto.from_config(config)
            except ValueError as exc:  # the family has no such head
                raise ModelBuildError(f"{spec} has no {task} model: {_first_line(exc)}") from exc

    return _call_on_meta(build, spec, task)


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def token_inputs(model: torch.nn.Module, batch: int, seq_len: int, task: str | None) -> Any:
    """input_ids (and labels where the model's forward takes them) as meta tensors: a keyword dict for
    models whose forward names ``input_ids``, else one positional tensor."""
    ids = torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        return ids
    inputs = {"input_ids": ids}
    if "labels" in params:
        labels_shape = (batch,) if task == "classification" else (batch, seq_len)
        inputs["labels"] = torch.empty(labels_shape, dtype=torch.long, device="meta")
    return inputs


def detection_inputs(model: torch.nn.Module, n: int, channels: int, height: int, width: int, boxes: int = 4,
                     train: bool = True) -> tuple:
    """A torchvision detector's inputs: a list of ``n`` images and, in training, a list of ``n`` targets
    with ``boxes`` valid boxes and labels each, plus masks or keypoints where the model's heads take them.
    Real tensors, with values a real step accepts (``--verify`` runs one)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(channels, height, width, generator=g) for _ in range(n)]
    if not train:
        return (images,)
    heads = getattr(model, "roi_heads", None)
    has_mask = callable(getattr(heads, "has_mask", None)) and heads.has_mask()
    has_keypoint = callable(getattr(heads, "has_keypoint", None)) and heads.has_keypoint()
    classes = max(2, int(getattr(getattr(heads, "box_predictor", None), "cls_score", torch.nn.Linear(1, 91)).out_features))
    targets = []
    for _ in range(n):
        corner = torch.rand(boxes, 2, generator=g) * torch.tensor([width, height]) * 0.6
        size = torch.rand(boxes, 2, generator=g) * torch.tensor([width, height]) * 0.3 + 2
        target = {"boxes": torch.cat([corner, corner + size], 1),
                  "labels": torch.randint(1, classes, (boxes,), generator=g)}
        if has_mask:
            target["masks"] = torch.zeros(boxes, height, width, dtype=torch.uint8)
        if has_keypoint:
            points = heads.keypoint_predictor.kps_score_lowres.out_channels
            xy = corner[:, None, :] + torch.rand(boxes, points, 2, generator=g) * size[:, None, :]
            target["keypoints"] = torch.cat([xy, torch.ones(boxes, points, 1)], 2)
        targets.append(target)
    return images, targets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
