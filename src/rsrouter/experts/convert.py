"""Turn a bare state dict, or a published checkpoint, into an expert folder.

``export_expert`` takes a safetensors state dict (what a training script saves).
``convert_checkpoint`` is the one explicit opt-in to read a pickle checkpoint (.pt/.pth/.bin/.ckpt),
and only with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects; it also
reads Cohen et al.'s ``checkpoint.pth.tar`` (``format="cohen"``) and transformers ViT folders.
The layouts themselves are in ``formats``. The result is always a safetensors expert folder.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import struct
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts.expert import PICKLE_SUFFIXES, Expert, check_state_dict
from rsrouter.experts.formats import (
    FORMATS,
    PUBLISHED_LAYOUTS,
    cohen_fields,
    hf_vit_fields,
    hf_vit_to_timm,
    is_timm_config,
    is_transformers_vit,
)
from rsrouter.experts.nets import build_classifier

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{path} is a pickle checkpoint; rsrouter loads safetensors only: convert it "
            "explicitly with `router convert-checkpoint`."
        )
    _input_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is not a safetensors file ({exc}).") from exc


def _input_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"{path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}."
        )
    return path


def load_pickle(path: str | os.PathLike):
    """A pickle checkpoint as saved, loaded with ``weights_only=True`` (no code runs)."""
    path = _input_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the refusal below is what matters, not the names
            names = []
        what = f" ({', '.join(names[:3])})" if names else ""
        raise UsageError(
            f"{path} holds Python objects{what} besides tensors; torch.load(weights_only=True) "
            "refuses them and rsrouter never unpickles anything else."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, KeyError, IndexError) as exc:
        # the legacy (non-zip) reader fails on stray bytes with whatever they provoke
        raise UsageError(f"{path} is not a PyTorch checkpoint.") from exc


def read_pickle_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict:
    """The tensors of a pickle checkpoint, loaded with ``weights_only=True`` (no code runs)."""
    return unwrap(load_pickle(path), key, path)


def unwrap(obj, key: str | None, where) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: under ``key``, or the usual nesting keys."""
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                raise UsageError(f"{where} has no entry {key!r}.")
            obj = obj[part]
    while isinstance(obj, dict) and not _is_state(obj):
        nested = [k for k in NESTED_KEYS if isinstance(obj.get(k), dict)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, dict) or not _is_state(obj):
        raise UsageError(f"{where} holds no state dict of tensors (use --key to point at one).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def fit_state_dict(
    state: dict, reference: dict, strip_prefix: str | None = None, arch: str | None = None
) -> dict:
    """Strip a wrapper prefix ("module.", "1.module.", …) and map a published layout of ``arch``
    (formats.PUBLISHED_LAYOUTS) so the keys match ``reference``; else return them as they are,
    for check_state_dict to show the difference."""
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    layout = PUBLISHED_LAYOUTS.get(arch)
    candidates = [state, _strip_wrapper(state, reference)]
    if layout is not None:
        prefix = common_prefix(state)
        candidates.append(layout({k[len(prefix) :]: v for k, v in state.items()}))
    for candidate in candidates:
        if candidate is not None and set(candidate) == set(reference):
            return candidate
    return state


def _strip_wrapper(state: dict, reference) -> dict | None:
    """``state`` without the prefix that makes its names those of ``reference``, if one does."""
    first = next(iter(state), "")
    for ref in reference:
        if first.endswith(ref):
            prefix = first[: len(first) - len(ref)]
            if prefix and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
                if set(stripped) == set(reference):
                    return stripped
    return None


def common_prefix(names) -> str:
    """The dotted prefix every name shares ("1.module." for a Sequential of a DataParallel)."""
    names = list(names)
    prefix = os.path.commonprefix(names) if names else ""
    return prefix[: prefix.rfind(".") + 1]


# what a bare state dict cannot tell: the flag that gives each
REQUIRED_FIELDS = {
    "arch": "--arch",
    "num_classes": "--num-classes",
    "in_chans": "--in-chans",
    "input_size": "--input-size",
}


def source_fields(
    fields: dict, format: str | None = None, *, where, checkpoint_arch: str | None = None
) -> dict:
    """The expert fields for a state dict: those given (None = not given) over the defaults of
    a known ``format``. The normalisation is never defaulted: a state dict does not record it."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if format == "cohen":
        if "sigma" not in fields:
            raise UsageError(
                "Cohen et al.'s models are each trained at one noise level: give --sigma (the "
                "noise_S folder the checkpoint came from)."
            )
        fields = cohen_fields(fields, checkpoint_arch)
    elif format is not None:
        raise UsageError(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}.")
    missing = [flag for name, flag in REQUIRED_FIELDS.items() if name not in fields]
    if missing:
        raise UsageError(
            f"give {', '.join(missing)} for {where} (or --format cohen --dataset cifar10 for a "
            "checkpoint of Cohen et al., Salman et al. or Jeong & Shin)."
        )
    if "mean" not in fields or "std" not in fields:
        raise UsageError(
            f"{where} does not record its input normalisation: give --mean and --std (--mean 0 "
            "--std 1 for a model that takes [0, 1] pixels as they are), or --format cohen "
            "--dataset cifar10 for a checkpoint of Cohen et al., Salman et al. or Jeong & Shin."
        )
    for name in ("mean", "std"):  # one value stands for every channel
        if len(fields[name]) == 1:
            fields[name] = list(fields[name]) * int(fields["in_chans"])
    return fields


def expert_from_state_dict(
    state: dict,
    *,
    arch: str,
    num_classes: int,
    in_chans: int,
    input_size,
    sigma: float | None = None,
    arch_args: dict | None = None,
    strip_prefix: str | None = None,
    **config_fields,
) -> Expert:
    """A classifier expert from a state dict that fits ``build_classifier(arch, …)``, as it is
    or in a published layout of that architecture (formats.PUBLISHED_LAYOUTS)."""
    arch_args = dict(arch_args or {})
    net = build_classifier(arch, num_classes, in_chans, **arch_args)
    state = fit_state_dict(state, net.state_dict(), strip_prefix, arch)
    check_state_dict(net, state, arch)
    net.load_state_dict(state, strict=True)
    return Expert.from_module(
        net,
        sigma=sigma,
        arch=arch,
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        arch_args=arch_args,
        **config_fields,
    ).eval()


def export_expert(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    *,
    strip_prefix: str | None = None,
    **fields,
) -> Path:
    """A safetensors state dict + architecture + sigma + normalisation → an expert folder.

    ``fields``: the ExpertConfig fields (None = not given); arch, num_classes, in_chans,
    input_size, mean and std are required."""
    state = read_safetensors(weights)
    fields = source_fields(fields, where=weights)
    return expert_from_state_dict(state, strip_prefix=strip_prefix, **fields).save_pretrained(out)


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    key: str | None = None,
    format: str | None = None,
    strip_prefix: str | None = None,
    **fields,
) -> Path:
    """A pickle checkpoint (read with weights_only=True) or a transformers ViT folder → an
    expert folder of safetensors.

    ``format="cohen"``: a ``checkpoint.pth.tar`` of Cohen et al. (Salman et al., Jeong & Shin):
    the architecture from its 'arch', mean/std and shape from ``dataset`` (cifar10, imagenet)."""
    path = Path(checkpoint)
    if path.is_dir():
        if format is not None or key is not None:
            raise UsageError(f"{path} is a folder: --format and --key apply to a checkpoint file.")
        state, found = read_transformers_vit(path)
        given = {k: v for k, v in fields.items() if v is not None}
        fields = source_fields({**found, **given}, where=path)
    else:
        obj = load_pickle(path)
        state = unwrap(obj, key, path)
        arch = obj.get("arch") if isinstance(obj, dict) else None
        fields = source_fields(
            fields, format, where=path, checkpoint_arch=arch if isinstance(arch, str) else None
        )
    return expert_from_state_dict(state, strip_prefix=strip_prefix, **fields).save_pretrained(out)


def read_transformers_vit(folder: Path) -> tuple[dict, dict]:
    """(state dict in timm's names, expert fields) of a ViTForImageClassification folder:
    model.safetensors, else pytorch_model.bin (this command is the opt-in to read it)."""
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{folder} is a folder without config.json: give a checkpoint file or a transformers "
            "ViT folder."
        )
    config = read_json(folder / "config.json")
    if not is_transformers_vit(config):
        direct = is_timm_config(config) or "kind" in config  # add-expert reads these folders
        raise UsageError(
            f"{folder} is not a transformers ViTForImageClassification folder; "
            + (
                f"add it directly: `router add-expert {shlex.quote(str(folder))} --sigma 0.25`."
                if direct
                else "give a checkpoint file."
            )
        )
    processor = folder / "preprocessor_config.json"
    fields = hf_vit_fields(
        config, read_json(processor) if processor.is_file() else None, folder / "config.json"
    )
    if (folder / "model.safetensors").is_file():
        state = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = read_pickle_checkpoint(folder / "pytorch_model.bin")
    else:
        raise UsageError(f"{folder} has neither model.safetensors nor pytorch_model.bin.")
    return hf_vit_to_timm(state), fields


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object.")
    return data
