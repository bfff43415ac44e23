"""Published checkpoint layouts, mapped onto the architectures rsrouter builds.

The field publishes classifiers in a few layouts: Cohen et al.'s ``checkpoint.pth.tar`` (also
Salman et al., Jeong & Shin: ``Sequential(NormalizeLayer, resnet)``, mean/std outside the state
dict), transformers' ViTForImageClassification folders and timm Hub folders. This module turns
their names, config files and preprocessing into rsrouter's; it reads no file (pure functions
over dicts), so the mappings are tested against the published key lists directly.

CIFAR ResNets are mapped, not renamed: rsrouter's ``CifarResNet`` keeps its module names
(``stem``, ``layers``, ``shortcut``) so that experts and routers saved before keep loading with
the same files, hashes and fingerprints.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from rsrouter.errors import UsageError

# Cohen et al. keep these in NormalizeLayer, outside the state dict (code/datasets.py).
COHEN_DATASETS = {
    "cifar10": {
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2023, 0.1994, 0.2010],
        "num_classes": 10,
        "in_chans": 3,
        "input_size": [32, 32],
    },
    "imagenet": {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "in_chans": 3,
        "input_size": [224, 224],
    },
}
# checkpoint['arch'] -> build_classifier name (torchvision's resnet50 names = timm's resnet50)
COHEN_ARCHS = {
    "cifar_resnet20": "cifar_resnet20",
    "cifar_resnet56": "cifar_resnet56",
    "cifar_resnet110": "cifar_resnet110",
    "resnet50": "resnet50",
}
FORMATS = ("cohen",)


def cohen_fields(fields: dict, checkpoint_arch: str | None) -> dict:
    """Defaults for a Cohen-format checkpoint: architecture from its 'arch', normalisation and
    shape from the dataset named with --dataset; what the user gave wins."""
    dataset = fields.get("dataset") or ""
    known = COHEN_DATASETS.get(dataset.lower().replace("-", ""))
    if known is None and not ("mean" in fields and "std" in fields):
        raise UsageError(
            f"--format cohen takes the normalisation from --dataset cifar10 or --dataset "
            f"imagenet (got {dataset!r}); for another dataset give --mean and --std."
        )
    defaults = dict(known or {})
    if checkpoint_arch in COHEN_ARCHS:
        defaults["arch"] = COHEN_ARCHS[checkpoint_arch]
    elif "arch" not in fields:
        raise UsageError(
            f"the checkpoint's arch {checkpoint_arch!r} is not one rsrouter maps "
            f"({', '.join(COHEN_ARCHS)}): give --arch."
        )
    return {**defaults, **fields}


_CIFAR_BLOCK = re.compile(r"^layer([123])\.(\d+)\.(.*)$")


def cifar_resnet_from_published(state: dict) -> dict:
    """Published CIFAR ResNet names (conv1, bn1, layer1-3.J, downsample, fc; He et al. as in
    locuslab/smoothing archs/cifar_resnet.py) -> rsrouter's CifarResNet (stem, layers.I,
    shortcut, fc). Names without a wrapper prefix; anything else passes unchanged."""
    blocks = [m for k in state if (m := _CIFAR_BLOCK.match(k))]
    if not blocks:
        return state
    per_stage = 1 + max(int(m[2]) for m in blocks)
    out = {}
    for name, value in state.items():
        if m := _CIFAR_BLOCK.match(name):
            rest = m[3]
            if rest.startswith("downsample."):
                rest = "shortcut." + rest.removeprefix("downsample.")
            name = f"layers.{(int(m[1]) - 1) * per_stage + int(m[2])}.{rest}"
        elif name.startswith("conv1."):
            name = "stem.0." + name.removeprefix("conv1.")
        elif name.startswith("bn1."):
            name = "stem.1." + name.removeprefix("bn1.")
        out[name] = value
    return out


# build_classifier name -> the published layout that maps onto it
PUBLISHED_LAYOUTS = {
    "cifar_resnet20": cifar_resnet_from_published,
    "cifar_resnet56": cifar_resnet_from_published,
    "cifar_resnet110": cifar_resnet_from_published,
}


# ---- transformers ViTForImageClassification -> timm VisionTransformer

HF_VIT_ARGS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "layer_norm_eps",
    "qkv_bias",
)


def hf_vit(
    *,
    num_classes: int,
    in_chans: int,
    image_size=224,
    patch_size: int = 16,
    hidden_size: int = 768,
    num_hidden_layers: int = 12,
    num_attention_heads: int = 12,
    intermediate_size: int = 3072,
    layer_norm_eps: float = 1e-12,
    qkv_bias: bool = True,
) -> nn.Module:
    """timm's VisionTransformer with the hyper-parameters of a transformers ViTConfig (its
    names), LayerNorm eps included, so a ViTForImageClassification maps on exactly."""
    from timm.models.vision_transformer import VisionTransformer

    if intermediate_size % hidden_size:
        raise UsageError(
            f"intermediate_size {intermediate_size} is not a multiple of hidden_size "
            f"{hidden_size}: timm's ViT cannot hold these weights."
        )
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=hidden_size,
        depth=num_hidden_layers,
        num_heads=num_attention_heads,
        mlp_ratio=intermediate_size / hidden_size,
        qkv_bias=qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
        act_layer=nn.GELU,
    )


def is_transformers_vit(config: dict) -> bool:
    return config.get("model_type") == "vit" and "hidden_size" in config


def hf_vit_fields(config: dict, preprocessor: dict | None, where) -> dict:
    """Expert config fields of a ViTForImageClassification folder (config.json and
    preprocessor_config.json); mean/std come from the processor or must be given."""
    if "ViTForImageClassification" not in config.get("architectures", []):
        raise UsageError(f"{where} is a transformers ViT but not a ViTForImageClassification.")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UsageError(
            f"{where} uses hidden_act {config['hidden_act']!r}; rsrouter maps only 'gelu'."
        )
    labels = config.get("id2label") or {}
    num_classes = len(labels) or int(config.get("num_labels", 0))
    if not num_classes:
        raise UsageError(f"{where} names no classes (id2label).")
    size = config.get("image_size", 224)
    fields = {
        "arch": "hf_vit",
        "arch_args": {k: config[k] for k in HF_VIT_ARGS if k in config},
        "num_classes": num_classes,
        "in_chans": int(config.get("num_channels", 3)),
        "input_size": [size, size] if isinstance(size, int) else list(size),
    }
    if len(labels) == num_classes:
        fields["class_names"] = [labels[str(i)] for i in range(num_classes)]
    if preprocessor and "image_mean" in preprocessor and "image_std" in preprocessor:
        fields["mean"] = [float(m) for m in preprocessor["image_mean"]]
        fields["std"] = [float(s) for s in preprocessor["image_std"]]
    return fields


def hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViTForImageClassification weight names -> timm VisionTransformer names (q, k, v are
    concatenated into qkv; the unused pooler is dropped)."""
    simple = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "vit.layernorm.weight": "norm.weight",
        "vit.layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    block = {
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    layer = re.compile(r"^vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
    out, qkv = {}, {}
    for name, value in state.items():
        if name.startswith("vit.pooler."):
            continue
        if name in simple:
            out[simple[name]] = value
        elif (m := layer.match(name)) and m[2] in block:
            out[f"blocks.{m[1]}.{block[m[2]]}.{m[3]}"] = value
        elif m and m[2].startswith("attention.attention."):
            qkv[(m[1], m[3], m[2].rsplit(".", 1)[1])] = value
        else:
            out[name] = value  # left for the key check to name
    for i, kind in sorted({(i, kind) for i, kind, _ in qkv}):
        parts = [qkv.get((i, kind, p)) for p in ("query", "key", "value")]
        if any(p is None for p in parts):
            raise UsageError(f"layer {i} of the ViT lacks one of query/key/value {kind}.")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


# ---- timm Hub folders (config.json with architecture, model_args, pretrained_cfg)


def is_timm_config(config: dict) -> bool:
    cfg = "pretrained_cfg" in config or "default_cfg" in config  # default_cfg: timm < 0.6
    return "architecture" in config and cfg and "kind" not in config


def timm_fields(config: dict, where) -> dict:
    """Expert config fields of a timm Hub folder: the architecture with its model_args, input
    size, mean and std from pretrained_cfg (timm's own loader applies the same)."""
    pre = config.get("pretrained_cfg") or config.get("default_cfg") or {}
    missing = [k for k in ("input_size", "mean", "std") if k not in pre]
    if missing:
        raise UsageError(f"{where} has no {', '.join(missing)} in its pretrained_cfg.")
    args = dict(config.get("model_args") or {})
    num_classes = int(args.pop("num_classes", config.get("num_classes", pre.get("num_classes"))))
    in_chans = int(args.pop("in_chans", pre["input_size"][0]))
    names = config.get("label_names") or []
    fields = {
        "kind": "classifier",
        "sigma": None,
        "arch": config["architecture"],
        "arch_args": args,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "input_size": list(pre["input_size"][1:]),
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "license": pre.get("license") or "unknown",
        "source": f"timm:{config['architecture']}" + (f".{pre['tag']}" if pre.get("tag") else ""),
    }
    if len(names) == num_classes:
        fields["class_names"] = list(names)
    return fields
