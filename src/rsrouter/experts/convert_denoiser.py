"""Published diffusion denoisers → a diffusers folder (UNet2DModel + DDPMScheduler, safetensors).

Three source formats, each read only on explicit opt-in (pickles with ``weights_only=True``):

- ``diffusers``: a diffusers folder or Hub repo whose UNet is a pickle ``.bin`` (e.g. the 2022
  revisions of google/ddpm-cifar10-32, written by diffusers 0.1.x with the old attention names
  ``query/key/value/proj_attn``);
- ``improved-diffusion`` (openai/improved-diffusion, e.g. Carlini et al.'s CIFAR-10 denoiser
  ``cifar10_uncond_50M_500K.pt``: cosine schedule, 4000 steps, learned variance, timesteps
  rescaled to t * 1000 / T before the UNet);
- ``guided-diffusion`` (openai/guided-diffusion, e.g. ``256x256_diffusion_uncond.pt``).

The openai UNets are mapped onto diffusers' own ``UNet2DModel`` (no UNet is written here): the
layout (levels, blocks per level, attention, resblock up/down sampling, scale-shift norm) is read
from the state dict's names and shapes; only the attention heads and the noise schedule, which a
state dict does not record, come from the format's published defaults or the options. A
learned-variance UNet keeps its 2C output channels; the denoiser uses the first C (epsilon).
Rescaled timesteps are baked into a ``learned`` time embedding: row t holds the sinusoidal
embedding of t * 1000 / T, computed exactly as the original does, so the UNet takes the integer
timestep of its own schedule and the folder stays plain diffusers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts.convert import read_pickle_checkpoint
from rsrouter.experts.expert import (
    PICKLE_SUFFIXES,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    denoiser_dirs,
    fetch_snapshot,
)
from rsrouter.io import atomic_dir, read_json

FORMATS = ("diffusers", "improved-diffusion", "guided-diffusion")
SCHEDULES = ("linear", "cosine")


@dataclass
class OpenAIDefaults:
    """What a published openai checkpoint does not record in its state dict."""

    schedule: str
    steps: int
    rescale_timesteps: bool
    num_heads: int | None  # heads per attention layer (improved-diffusion)
    head_channels: int | None  # channels per head (guided-diffusion), wins over num_heads
    sample_size: int


# improved-diffusion's CIFAR-10 L_hybrid model (Carlini et al.): --diffusion_steps 4000
# --noise_schedule cosine, rescale_timesteps=True, num_heads 4; guided-diffusion's 256x256
# unconditional model: linear, 1000 steps, num_head_channels 64.
DEFAULTS = {
    "improved-diffusion": OpenAIDefaults("cosine", 4000, True, 4, None, 32),
    "guided-diffusion": OpenAIDefaults("linear", 1000, False, None, 64, 256),
}


# ---- the openai UNet layout, read from the state dict


@dataclass
class OpenAILayout:
    in_channels: int
    out_channels: int
    model_channels: int
    channels: list[int]  # output channels of each level
    attention: list[bool]  # attention after each resblock of the level
    num_res_blocks: int
    updown: bool  # resblock_updown: down/upsampling by a ResBlock, else a (strided) conv
    scale_shift: bool


def read_layout(state: dict, where) -> OpenAILayout:
    """The UNet's structure from its parameter names and shapes."""
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise UsageError(
            f"{where} is not an openai improved/guided-diffusion UNet state dict "
            "(no input_blocks.0.0.weight / out.2.weight)."
        )
    if "label_emb.weight" in state:
        raise UsageError(
            f"{where} is a class-conditional UNet (label_emb); denoised smoothing needs an "
            "unconditional one."
        )
    n_in = _count(state, "input_blocks")
    n_out = _count(state, "output_blocks")
    ups = [k for k in range(n_out) if _has_upsample(state, k)]
    nrb = ups[0] if ups else n_out - 1
    levels = n_out // (nrb + 1)
    if nrb < 1 or levels * (nrb + 1) != n_out or n_in != 1 + levels * nrb + (levels - 1):
        raise UsageError(f"{where} has an openai UNet layout this importer does not know.")
    channels, attention = [], []
    try:
        for level in range(levels):
            first = f"input_blocks.{1 + level * (nrb + 1)}"
            channels.append(int(state[f"{first}.0.out_layers.3.weight"].shape[0]))
            attention.append(f"{first}.1.qkv.weight" in state)
        emb = state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    except KeyError as exc:
        raise UsageError(f"{where} lacks {exc}, which an openai UNet's ResBlock has.") from exc
    weight = state["input_blocks.0.0.weight"]
    return OpenAILayout(
        in_channels=int(weight.shape[1]),
        out_channels=int(state["out.2.weight"].shape[0]),
        model_channels=int(weight.shape[0]),
        channels=channels,
        attention=attention,
        num_res_blocks=nrb,
        updown=levels > 1 and f"input_blocks.{1 + nrb}.0.in_layers.0.weight" in state,
        scale_shift=int(emb) == 2 * channels[0],
    )


def _count(state: dict, name: str) -> int:
    pattern = re.compile(rf"^{name}\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def _has_upsample(state: dict, k: int) -> bool:
    """An output block ends a level when it holds an upsampler (a conv or a ResBlock) last."""
    p = f"output_blocks.{k}"
    return any(
        f"{p}.{j}.conv.weight" in state or f"{p}.{j}.in_layers.0.weight" in state for j in (1, 2)
    )


def head_dim(layout: OpenAILayout, num_heads: int | None, head_channels: int | None) -> int:
    """Channels per attention head, the same at every attention layer (UNet2DModel has one)."""
    widths = [c for c, a in zip(layout.channels, layout.attention, strict=True) if a]
    widths.append(layout.channels[-1])  # the middle block always has attention
    if head_channels:
        dims = {head_channels}
        bad = [c for c in widths if c % head_channels]
    else:
        dims = {c // num_heads for c in widths}
        bad = [c for c in widths if c % num_heads]
    if bad or len(dims) != 1:
        raise UsageError(
            f"attention widths {sorted(set(widths))} do not split into equal heads with "
            + (f"--head-channels {head_channels}" if head_channels else f"--num-heads {num_heads}")
            + "; diffusers' UNet2DModel needs one head size for every layer."
        )
    return dims.pop()


# ---- the matching diffusers UNet2DModel


def unet_config(
    layout: OpenAILayout, *, attention_head_dim: int, steps: int, rescale: bool, sample_size: int
) -> dict:
    down, up = [], []
    for attn in layout.attention:
        down.append(
            "AttnDownBlock2D"
            if attn
            else ("ResnetDownsampleBlock2D" if layout.updown else "DownBlock2D")
        )
    for attn in reversed(layout.attention):
        up.append(
            "AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if layout.updown else "UpBlock2D")
        )
    sampling = "resnet" if layout.updown else "conv"
    return {
        "sample_size": sample_size,
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "block_out_channels": layout.channels,
        "layers_per_block": layout.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "downsample_type": sampling,
        "upsample_type": sampling,
        "downsample_padding": 1,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # else diffusers drops the middle block's norm (scale_shift)
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if layout.scale_shift else "default",
        "act_fn": "silu",
        "flip_sin_to_cos": True,  # openai: cat(cos, sin)
        "freq_shift": 0,
        "time_embedding_type": "learned" if rescale else "positional",
        "num_train_timesteps": steps if rescale else None,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
    }


def timestep_table(steps: int, dim: int) -> torch.Tensor:
    """Row t: openai's timestep_embedding(t * 1000 / steps, dim), the same float32 operations."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    )
    t = torch.arange(steps).float() * (1000.0 / steps)
    args = t[:, None].float() * freqs[None]
    table = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=-1)
    return table


RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def module_pairs(layout: OpenAILayout) -> list[tuple[str, str, str]]:
    """(openai prefix, diffusers prefix, kind): kind same (names only), resnet or attn."""
    nrb, levels = layout.num_res_blocks, len(layout.channels)
    pairs = [("input_blocks.0.0", "conv_in", "same")]
    k = 1
    for level in range(levels):
        for j in range(nrb):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if layout.attention[level]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level < levels - 1:
            down = f"down_blocks.{level}.downsamplers.0"
            if layout.updown:
                pairs.append((f"input_blocks.{k}.0", down, "resnet"))
            else:
                pairs.append((f"input_blocks.{k}.0.op", f"{down}.conv", "same"))
            k += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    k = 0
    for u in range(levels):
        attn = layout.attention[levels - 1 - u]
        for i in range(nrb + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{i}", "resnet"))
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{i}", "attn"))
            if u < levels - 1 and i == nrb:
                src = f"output_blocks.{k}.{2 if attn else 1}"
                up = f"up_blocks.{u}.upsamplers.0"
                if layout.updown:
                    pairs.append((src, up, "resnet"))
                else:
                    pairs.append((f"{src}.conv", f"{up}.conv", "same"))
            k += 1
    pairs += [
        ("time_embed.0", "time_embedding.linear_1", "same"),
        ("time_embed.2", "time_embedding.linear_2", "same"),
        ("out.0", "conv_norm_out", "same"),
        ("out.2", "conv_out", "same"),
    ]
    return pairs


ATTENTION_ORDERS = ("legacy", "new")


def split_qkv(t: torch.Tensor, head: int, order: str) -> list[torch.Tensor]:
    """q, k, v rows of an openai qkv conv1d weight or bias (3C, ...), each (C, ...).

    legacy (QKVAttentionLegacy, the published models): per head, [q | k | v] of ``head``
    channels; new (QKVAttention, use_new_attention_order): [q of all heads | k | v].
    """
    width = t.shape[0] // 3
    if order == "new":
        return list(t.reshape(3, width, *t.shape[1:]).unbind(0))
    parts = t.reshape(width // head, 3, head, *t.shape[1:])
    return [parts[:, i].reshape(width, *t.shape[1:]) for i in range(3)]


def map_state_dict(
    state: dict, layout: OpenAILayout, head: int, order: str = "legacy"
) -> dict[str, torch.Tensor]:
    """The openai state dict under diffusers' names and shapes (qkv split per head)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name in state:
            used.add(name)
            return state[name].float()
        return None

    for src, dst, kind in module_pairs(layout):
        for p in ("weight", "bias"):
            if kind == "same":
                if (t := take(f"{src}.{p}")) is not None:
                    out[f"{dst}.{p}"] = t
            elif kind == "resnet":
                for a, b in RESNET.items():
                    if (t := take(f"{src}.{a}.{p}")) is not None:
                        out[f"{dst}.{b}.{p}"] = t
            else:
                if (t := take(f"{src}.norm.{p}")) is not None:
                    out[f"{dst}.group_norm.{p}"] = t
                if (t := take(f"{src}.proj_out.{p}")) is not None:  # conv1d (C, C, 1) → linear
                    out[f"{dst}.to_out.0.{p}"] = t.reshape(t.shape[0], -1) if t.ndim > 1 else t
                if (t := take(f"{src}.qkv.{p}")) is not None:
                    q_k_v = split_qkv(t, head, order)
                    for name, w in zip(("to_q", "to_k", "to_v"), q_k_v, strict=True):
                        out[f"{dst}.{name}.{p}"] = w.reshape(w.shape[0], -1) if w.ndim > 1 else w
    left = sorted(set(state) - used)
    if left:
        raise UsageError(
            f"the checkpoint has weights this importer does not place (first: {left[:3]}); "
            "it is not the improved/guided-diffusion UNet layout."
        )
    return out


# ---- schedulers


def ddpm_scheduler(schedule: str, steps: int, learned_variance: bool):
    """openai's schedule as a diffusers DDPMScheduler (linear betas scaled to 1000 steps)."""
    from diffusers import DDPMScheduler

    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}.")
    kwargs = {"beta_schedule": "squaredcos_cap_v2"}
    if schedule == "linear":  # get_named_beta_schedule: scale = 1000 / steps
        scale = 1000 / steps
        kwargs = {"beta_schedule": "linear", "beta_start": scale * 0.0001, "beta_end": scale * 0.02}
    return DDPMScheduler(
        num_train_timesteps=steps,
        variance_type="learned_range" if learned_variance else "fixed_large",
        clip_sample=True,
        prediction_type="epsilon",
        **kwargs,
    )


# ---- the commands' API


def convert_openai_unet(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    schedule: str | None = None,
    steps: int | None = None,
    rescale_timesteps: bool | None = None,
    num_heads: int | None = None,
    head_channels: int | None = None,
    sample_size: int | None = None,
    attention_order: str = "legacy",
    key: str | None = None,
) -> Path:
    """An improved/guided-diffusion ``.pt`` UNet state dict → a diffusers denoiser folder."""
    from diffusers import UNet2DModel

    d = DEFAULTS[format]
    if num_heads is None and head_channels is None:
        num_heads, head_channels = d.num_heads, d.head_channels
    if (num_heads is not None and num_heads < 1) or (
        head_channels is not None and head_channels < 1
    ):
        raise UsageError("--num-heads and --head-channels must be positive.")
    if attention_order not in ATTENTION_ORDERS:
        raise UsageError(f"--attention-order must be legacy or new, got {attention_order!r}.")
    schedule = schedule or d.schedule
    steps = steps or d.steps
    rescale = d.rescale_timesteps if rescale_timesteps is None else rescale_timesteps
    state = read_pickle_checkpoint(checkpoint, key)
    layout = read_layout(state, checkpoint)
    head = head_dim(layout, num_heads, head_channels)
    config = unet_config(
        layout,
        attention_head_dim=head,
        steps=steps,
        rescale=rescale,
        sample_size=sample_size or d.sample_size,
    )
    mapped = map_state_dict(state, layout, head, attention_order)
    unet = UNet2DModel(**config)
    if rescale:
        mapped["time_proj.weight"] = timestep_table(steps, layout.model_channels)
    _load_strict(unet, mapped, checkpoint)
    learned = layout.out_channels == 2 * layout.in_channels
    return write_denoiser(unet, ddpm_scheduler(schedule, steps, learned), out)


def convert_diffusers_pickle(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir=None,
    token=None,
) -> Path:
    """A diffusers UNet2DModel folder or Hub repo whose weights are a pickle ``.bin``."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = Path(source).expanduser()
    if not folder.is_dir():
        if Path(source).suffix.lower() in PICKLE_SUFFIXES or str(source).count("/") != 1:
            raise UsageError(
                f"{source} is neither a folder nor a Hub repo id (org/name): --format diffusers "
                "takes the folder that holds config.json and the .bin."
            )
        folder, _ = fetch_snapshot(
            str(source),
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            allow_patterns=["*.json", "*.bin", "unet/*.json", "unet/*.bin", "scheduler/*.json"],
        )
    elif revision:
        raise UsageError(f"{source} is a local folder: --revision applies to Hub repos.")
    unet_dir, sched_dir = denoiser_dirs(folder)
    if not (unet_dir / UNET_CONFIG).is_file():
        raise UsageError(f"{folder} has no diffusers UNet (config.json).")
    if not (sched_dir / SCHEDULER_CONFIG).is_file():
        raise UsageError(f"{folder} has no {SCHEDULER_CONFIG} (a diffusers DDPM scheduler).")
    weights = unet_dir / "diffusion_pytorch_model.bin"
    if not weights.is_file():
        raise UsageError(f"{unet_dir} has no diffusion_pytorch_model.bin to convert.")
    config = read_json(unet_dir / UNET_CONFIG)
    state = rename_old_attention(read_pickle_checkpoint(weights))
    try:
        unet = UNet2DModel.from_config(config)
        scheduler = DDPMScheduler.from_config(read_json(sched_dir / SCHEDULER_CONFIG))
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"{folder} is not a diffusers UNet2DModel + DDPMScheduler ({exc})."
        ) from exc
    _load_strict(unet, state, weights)
    return write_denoiser(unet, scheduler, out)


OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_old_attention(state: dict) -> dict:
    """diffusers <= 0.14 attention names (query/key/value/proj_attn) → to_q/to_k/to_v/to_out.0."""
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {
        pattern.sub(lambda m: m.group(1) + OLD_ATTENTION[m.group(2)] + ".", k): v
        for k, v in state.items()
    }


def _load_strict(unet, state: dict, where) -> None:
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [k for k in want if k in got and want[k] != got[k]][:3]
        raise UsageError(
            f"{where} does not fit the UNet2DModel its config describes (missing {missing}, "
            f"unexpected {extra}, other shape {shapes})."
        )
    unet.load_state_dict(state, strict=True)


def write_denoiser(unet, scheduler, out: str | os.PathLike) -> Path:
    """Save UNet (safetensors) + scheduler config to the new folder ``out``; all or nothing."""
    with atomic_dir(out) as tmp:
        unet.eval().save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
    return Path(out)
