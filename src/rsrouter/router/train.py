"""Training the router on radius tables (the paper's §5.2.1 objective).

L = E_x[ w_e(x) · ( softCE(x) + w_r(x) · L_con(x) ) ] with soft labels softmax(R / T) (or,
with ``target = "utility"``, softmax(U / T) where U values each radius by how rare it is: see
``radius_utility``), class balance w_e = 1/q_best(x), and the consistency term of Jeong & Shin
(2020) over m noisy copies,
L_con = λ · mean_j KL(p̄ ‖ p_j) + η · H(p̄), weighted per input by w_r (none = 1, weak / strong =
the radius of the smallest / largest sigma the router picks among the copies, over C). Inputs
that no expert certifies are dropped. AdamW with lr × gamma every ``lr_step`` epochs; an atomic
checkpoint each epoch; a rerun resumes and gives bit-identical weights on CPU.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch.nn import functional as F

from rsrouter.errors import UsageError
from rsrouter.experts.train import consistency_terms
from rsrouter.io import atomic_path, safetensors_readable, sha256_json, write_safetensors
from rsrouter.progress import note, progress_bar
from rsrouter.router import gate as gates
from rsrouter.router.model import RouterModel
from rsrouter.router.tables import TABLE_STAGE, RadiusTable
from rsrouter.smoothing import check_count

WEIGHTINGS = ("none", "weak", "strong")
TARGETS = ("radius", "utility")  # what the soft labels are a softmax of


@dataclass(frozen=True)
class RouterTrainConfig:
    """Router training hyperparameters (workspace [train]; CLI flags override)."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.01
    weight_decay: float = 0.01
    lr_step: int = 0  # epochs between lr × lr_gamma; 0 = epochs / 3 (the paper's schedule)
    lr_gamma: float = 0.5
    noise_copies: int = 2  # m
    consistency_lambda: float = 40.0  # λ (CIFAR-10 in the paper; ImageNet 10)
    consistency_eta: float = 0.5  # η
    consistency_weight: str = "strong"  # w_r: none / weak / strong
    balance: bool = True  # w_e = 1/q_i; off for strong experts (§6.1)
    soft_label_scale: float = 1.0  # T in softmax(R / T)
    seed: int = 0
    head_only: bool = False  # train the output layer only: a probe on [router] init's features
    target: str = "radius"  # soft labels softmax(R / T) (the paper's) or softmax(U / T) (utility)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "noise_copies"):
            check_count(name, getattr(self, name))
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError("lr must be positive and weight_decay non-negative.")
        if self.lr_step < 0 or not 0 < self.lr_gamma <= 1:
            raise UsageError("lr_step must be >= 0 and lr_gamma in (0, 1].")
        if self.consistency_lambda < 0 or self.consistency_eta < 0:
            raise UsageError("the consistency weights lambda and eta must be non-negative.")
        if self.consistency_weight not in WEIGHTINGS:
            raise UsageError(f"consistency_weight must be one of {', '.join(WEIGHTINGS)}.")
        if self.soft_label_scale <= 0:
            raise UsageError("soft_label_scale must be positive.")
        if self.target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}.")

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> RouterTrainConfig:
        """From a workspace [train] section plus CLI overrides (None = not given)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise UsageError(f"unknown [train] setting(s): {', '.join(unknown)}.")
        values = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    @property
    def step(self) -> int:
        return self.lr_step or max(1, self.epochs // 3)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.head_only:  # keeps the run keys of routers trained before it existed
            del d["head_only"]
        if self.target == "radius":  # the same
            del d["target"]
        return d


# ---------------------------------------------------------------- the objective (pure)


def soft_labels(radii: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """y_i = softmax_i(R_i / T) per row of (B, E) radii."""
    return torch.softmax(radii / scale, dim=-1)


UTILITY_STEP = 0.25  # the radius grid of the utility target (the report's regret grid)


def radius_utility(radii: torch.Tensor, step: float = UTILITY_STEP) -> torch.Tensor:
    """U_i(x) = sum over r = 0, step, ... of [expert i certifies x at r] / env(r) per row.

    env(r) is the best single expert's certified share at r over the table's rows (the
    envelope the regret is measured against). An expert that certifies x to a radius few
    experts reach earns much; the softmax of U is sharp where the paper's softmax(R) is flat
    (radii (0.4, 0, 0) give targets (0.43, 0.29, 0.29)).
    """
    radii = radii.float()
    grid = torch.arange(0.0, float(radii.max()) + 1e-9, step, device=radii.device)
    certified = ((radii.unsqueeze(-1) >= grid) & (radii.unsqueeze(-1) > 0)).float()  # (N, E, G)
    env = certified.mean(0).max(0).values.clamp_min(1.0 / len(radii))  # (G,)
    return (certified / env).sum(-1)


def balance_weights(radii: torch.Tensor) -> torch.Tensor:
    """w_e(x) = 1 / q_best(x), q_i = share of rows whose best expert is i."""
    best = radii.argmax(dim=1)
    q = torch.bincount(best, minlength=radii.shape[1]).double() / len(best)
    return (1.0 / q[best]).to(radii.dtype)


def consistency_weights(
    logits: torch.Tensor, radii: torch.Tensor, sigmas: torch.Tensor, mode: str, scale: float
) -> torch.Tensor:
    """w_r per row: 1 (none), or R(x, σ̂_min) / C (weak), R(x, σ̂_max) / C (strong).

    σ̂_min / σ̂_max are the smallest / largest sigma the router picks among the m copies; two
    experts with the same sigma are told apart by their radius (smaller for weak).
    """
    if mode == "none":
        return torch.ones(radii.shape[0], dtype=radii.dtype, device=radii.device)
    picks = logits.detach().argmax(dim=-1)  # (m, B)
    s = sigmas.to(radii.device)[picks]
    r = radii.gather(1, picks.T).T  # (m, B)
    if mode == "weak":
        chosen = torch.where(s == s.min(0).values, r, torch.inf).min(0).values
    else:
        chosen = torch.where(s == s.max(0).values, r, -torch.inf).max(0).values
    return chosen / scale


def router_loss(
    logits: torch.Tensor,
    radii: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    w_e: torch.Tensor | None = None,
    lam: float = 40.0,
    eta: float = 0.5,
    weighting: str = "strong",
    radius_scale: float = 1.0,
    label_scale: float = 1.0,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The router objective on (m, B, E) logits of m noisy copies and (B, E) radii (the soft
    labels are softmax(targets / T), targets = the radii unless given).

    Returns the loss and its parts (batch means, detached 0-d tensors on the logits' device, so
    that logging them does not wait for the device): soft_ce, kl, entropy, consistency, w_r.
    """
    if logits.ndim != 3 or logits.shape[1:] != radii.shape:
        raise UsageError(f"logits {tuple(logits.shape)} do not fit radii {tuple(radii.shape)}.")
    logits, radii = logits.float(), radii.float()
    log_p = F.log_softmax(logits, dim=-1)
    y = soft_labels(radii if targets is None else targets.float(), label_scale)
    soft_ce = -(y.unsqueeze(0) * log_p).sum(-1).mean(0)  # (B,)
    kl, entropy = consistency_terms(logits)
    con = lam * kl + eta * entropy
    w_r = consistency_weights(logits, radii, sigmas, weighting, radius_scale)
    w_e = torch.ones_like(soft_ce) if w_e is None else w_e.float().to(soft_ce.device)
    loss = (w_e * (soft_ce + w_r * con)).mean()
    parts = {
        "soft_ce": soft_ce,
        "kl": kl,
        "entropy": entropy,
        "consistency": con,
        "w_r": w_r,
    }
    return loss, {k: v.detach().mean() for k, v in parts.items()}


# ---------------------------------------------------------------- training loop


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(sha256_json([int(seed), int(epoch), int(stream)])[:15], 16)


def _checkpoint_paths(folder: Path, epoch: int) -> tuple[Path, Path]:
    stem = folder / "checkpoints" / f"epoch-{epoch:04d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".optim.pt")


def _latest_checkpoint(folder: Path, run_key: str, epochs: int):
    for epoch in range(epochs, 0, -1):
        weights, state = _checkpoint_paths(folder, epoch)
        if safetensors_readable(weights) and state.is_file():  # a corrupt one: not resumed
            with safe_open(str(weights), framework="pt") as fh:
                if (fh.metadata() or {}).get("run") == run_key:
                    return epoch, weights, state
    return None


def _save_checkpoint(folder, run_key, epoch, router, opt, sched, history):
    weights, state = _checkpoint_paths(folder, epoch)
    buffer = io.BytesIO()  # serialised first and written by Python: a full disk is an OSError
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history}, buffer)  # fmt: skip
    with atomic_path(state) as tmp:  # the weights file, written last, marks a whole checkpoint
        tmp.write_bytes(buffer.getvalue())
    metadata = {"run": run_key, "epoch": str(epoch)}
    write_safetensors(weights, router.classifier.state_dict(), metadata=metadata)
    for old in (folder / "checkpoints").glob("epoch-*"):
        if not old.name.startswith(f"epoch-{epoch:04d}."):
            old.unlink(missing_ok=True)


def _load_checkpoint(router, opt, sched, weights: Path, state: Path) -> list[dict]:
    from safetensors.torch import load_file

    router.classifier.load_state_dict(load_file(str(weights)))
    try:
        saved = torch.load(state, weights_only=True)  # our own file, and still weights_only
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UsageError(
            f"{state} is truncated or corrupt; delete it to restart training from the start."
        ) from exc
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return list(saved["history"])


def check_head_only(config: RouterTrainConfig, init: str | None) -> None:
    if config.head_only and not init:
        raise UsageError(
            "head_only trains the output layer alone: start the router from an expert's "
            "features with [router] init (or --init)."
        )


def train_router(
    router: RouterModel,
    table: RadiusTable,
    images: torch.Tensor,
    out_dir: str | Path,
    config: RouterTrainConfig = RouterTrainConfig(),  # noqa: B008 (frozen, immutable)
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[dict]:
    """Train ``router`` in place on ``table`` (rows index ``images``); saves it to ``out_dir``.

    Resumes from the latest checkpoint of the same run in ``out_dir/checkpoints``. Returns the
    per-epoch history (loss, its parts, and how often the router picks the best expert).
    """
    if tuple(table.names) != router.expert_names:
        raise UsageError(
            f"the table has experts {list(table.names)}, the router {list(router.expert_names)}."
        )
    if router.class_map is not None:  # routes by a fixed table: nothing to learn
        router.eval().save_pretrained(out_dir)
        return []
    check_head_only(config, router.info.get("init"))
    keep = table.certified
    if int(keep.sum()) == 0:
        raise UsageError("no expert certifies any input of the table: nothing to train on.")
    radii = table.radii[keep].float()
    rows = table.indices[keep]
    images = torch.as_tensor(images)
    if tuple(images.shape[1:]) != router.input_shape:
        raise UsageError(
            f"images have shape {tuple(images.shape[1:])}, the router takes {router.input_shape}."
        )
    targets = radii if config.target == "radius" else radius_utility(radii)
    w_e = balance_weights(targets) if config.balance else torch.ones(len(radii))
    scale = float(radii.max())
    sigmas = torch.tensor(router.sigmas)
    device = torch.device(device)
    best = targets.argmax(dim=1).to(device)
    bf16 = device.type == "cuda"
    out_dir = Path(out_dir)
    table_info = {
        "n": table.n,
        "alpha": table.alpha,
        "seed": table.seed,
        "subset": table.subset,
        "dataset_fingerprint": table.dataset_fingerprint,
        "stage": TABLE_STAGE,  # the tables' noise stream: a router of older tables is retrained
        "rows": len(table.indices),
        "rows_kept": int(keep.sum()),
    }
    structure = {k: v for k, v in router.config().items() if k not in router.info}
    run_key = sha256_json(
        {
            # an expert's weights started it (absent: the seed did; keys stay as they were)
            **({"init": router.info["init"]} if router.info.get("init") else {}),
            "config": config.to_dict(),
            "table": table_info,
            "router": structure,
            "fingerprints": list(table.fingerprints),
        }
    )
    router.to(device)
    if router.denoiser is not None:
        router.denoiser.requires_grad_(False)
    params = list(router.trainable_parameters())
    if config.head_only:
        for frozen in params[:-2]:  # all but the output layer's weight and bias
            frozen.requires_grad_(False)
        params = params[-2:]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step, gamma=config.lr_gamma)
    history: list[dict] = []
    start = 0
    found = _latest_checkpoint(out_dir, run_key, config.epochs)
    if found:
        start, weights, state = found
        history = _load_checkpoint(router, opt, sched, weights, state)
        note(f"resuming from epoch {start} of {config.epochs}: {weights}", enabled=progress)
    m, steps_per_epoch = config.noise_copies, -(-len(rows) // config.batch_size)
    total = (config.epochs - start) * steps_per_epoch
    with progress_bar("train router", total, enabled=progress and total > 0) as advance:
        for epoch in range(start + 1, config.epochs + 1):
            router.train()
            if router.denoiser is not None:
                router.denoiser.eval()  # frozen: only the classifier learns
            if config.head_only:
                router.classifier.eval()  # frozen features: no batch-norm or dropout updates
            order = torch.randperm(
                len(rows),
                generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0)),
            )
            noise_gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 1))
            sums: dict[str, torch.Tensor] = {}  # on the device: read once per epoch
            for batch in order.split(config.batch_size):
                x = images[rows[batch]].float()
                noise = torch.randn((m, *x.shape), generator=noise_gen)
                noisy = (x.unsqueeze(0) + router.sigma_e * noise).flatten(0, 1).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = router(noisy)
                logits = logits.float().view(m, len(batch), -1)
                loss, parts = router_loss(
                    logits,
                    radii[batch].to(device),
                    sigmas=sigmas,
                    w_e=w_e[batch],
                    lam=config.consistency_lambda,
                    eta=config.consistency_eta,
                    weighting=config.consistency_weight,
                    radius_scale=scale,
                    label_scale=config.soft_label_scale,
                    targets=None if targets is radii else targets[batch].to(device),
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                parts["loss"] = loss.detach()
                parts["picks_best"] = (
                    (logits.detach().argmax(-1) == best[batch.to(device)]).float().mean()
                )
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch)
                advance(1)
            sched.step()
            history.append({"epoch": epoch, **{k: float(v) / len(rows) for k, v in sums.items()}})
            _save_checkpoint(out_dir, run_key, epoch, router, opt, sched, history)
    router.eval()
    router.info.update({"training": config.to_dict(), "table": table_info, "history": history[-1:]})
    router.save_pretrained(out_dir)
    return history


# ---------------------------------------------------------------- workspace level

GATE_KINDS = ("gate", "class-gate")  # fitted on the val split, not trained on the tables
KINDS = ("learned", "class-map", *GATE_KINDS)

ROUTER_DEFAULTS = {
    # learned: the paper's router, trained on the radius tables; class-map: see class_map;
    # gate: a copy of the sigma_e expert whose own uncertainty on x + δ picks the expert through
    # thresholds fitted on the val split (router/gate.py, composition/tuning.py); class-gate: a
    # gate with one threshold row per class the copy predicts on the draw
    # None = class-map when class_map is set, else gate when the workspace has a val split (the
    # best design measured, docs/results/routing.md), else learned (the paper's)
    "kind": None,
    "arch": "small_cnn",
    "arch_args": {},
    "sigma_e": None,  # None = the largest expert sigma
    "denoiser": None,  # a registered denoised expert's name, or a diffusers folder
    "mean": None,  # None = the first expert's normalisation
    "std": None,
    "init": None,  # a registered expert whose classifier weights start the router's (not its head)
    # {class name or index: expert name}: a class-map router, a copy of the `init` expert (default:
    # the expert at sigma_e) whose predicted class picks the expert; unlisted classes go to it
    "class_map": None,
    "gate": None,  # a fitted gate {score, thresholds, order}; written by `router train --kind gate`
}


def router_kind(settings: dict) -> str:
    """The router design [router] asks for (checked)."""
    kind = settings.get("kind") or ("class-map" if settings.get("class_map") else "learned")
    if kind not in KINDS:
        raise UsageError(f"[router] kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if kind != "class-map" and settings.get("class_map"):
        raise UsageError(f"a {kind} router takes no class_map: drop it or use kind class-map.")
    if kind == "class-map" and not settings.get("class_map"):
        raise UsageError("a class-map router needs class_map (`router train --class-map ...`).")
    return kind


def has_validation(ws) -> bool:
    """Whether the workspace holds out a val split ([data] validation = K > 0)."""
    return bool(ws.settings("data").get("validation"))


def router_settings(ws, **overrides) -> dict:
    """[router] over the defaults, then the overrides that are not None. With no kind and no
    class map, the kind is class-gate when the workspace has a val split, else learned."""
    settings = ws.settings("router")
    unknown = sorted(set(settings) - set(ROUTER_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown [router] setting(s) in {ws.path}: {', '.join(unknown)}.")
    out = {**ROUTER_DEFAULTS, **settings, **{k: v for k, v in overrides.items() if v is not None}}
    if out["kind"] is None and not out.get("class_map"):
        out["kind"] = "class-gate" if has_validation(ws) else "learned"
    return out


def _router_denoiser(spec, experts: dict):
    if not spec:
        return None, None
    if spec in experts:
        expert = experts[spec]
        if getattr(expert, "denoiser", None) is None:
            raise UsageError(f"expert {spec!r} has no denoiser to put in front of the router.")
        return expert.denoiser.unet, expert.scheduler
    from rsrouter.experts.expert import load_denoiser

    folder = Path(spec)
    if not folder.is_dir():
        raise UsageError(f"router denoiser {spec!r} is neither a registered expert nor a folder.")
    return load_denoiser(folder)


def init_from_expert(router: RouterModel, expert, name: str, *, head: bool = False) -> None:
    """Copy ``expert``'s classifier weights into the router's, all but the output layer.

    The largest-sigma expert was trained on x + N(0, sigma_e^2): its features are what the
    router sees. Needs the same architecture and width (only the output layer differs), or,
    with ``head`` (a class-map router), the same classifier outright: every weight is copied.
    """
    source = getattr(expert, "classifier", None)
    if source is None or getattr(expert, "denoiser", None) is not None:
        raise UsageError(f"router init {name!r} must be a classifier expert without a denoiser.")
    theirs, mine = source.state_dict(), router.classifier.state_dict()
    differ = sorted(k for k in mine if k in theirs and theirs[k].shape != mine[k].shape)
    last = [] if head else list(mine)[-2:]  # the output layer's weight and bias
    if set(theirs) != set(mine) or differ != sorted(last):
        config = getattr(expert, "config", None)
        theirs_arch = f"{config.arch} {config.arch_args}" if config is not None else "another"
        raise UsageError(
            f"router init {name!r} is a {theirs_arch} classifier but the router's architecture is "
            f"{router.arch} {router.arch_args}: set [router] arch and arch_args in router.toml "
            "(or --arch) to the expert's, or leave out --init."
        )
    with torch.no_grad():
        for key, value in mine.items():
            if key not in last:
                value.copy_(theirs[key])


def class_map_source(experts: dict, settings: dict) -> str:
    """The expert a class-map router copies: [router] init, else the one whose sigma is sigma_e."""
    if settings.get("init"):
        return settings["init"]
    sigma_e = settings.get("sigma_e") or max(e.sigma for e in experts.values())
    matches = [name for name, e in experts.items() if float(e.sigma) == float(sigma_e)]
    if len(matches) != 1:
        raise UsageError(
            "a class-map or gate router copies one expert: set [router] init (no single expert "
            f"has sigma_e = {sigma_e:g})."
        )
    return matches[0]


def resolve_class_map(mapping: dict, names: list[str], class_names: list[str], source: str):
    """{class name or index: expert name} -> one expert index per class (unlisted: ``source``)."""
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError('class_map must be a table of class = expert name, e.g. {Shirt = "a"}.')
    if not class_names:
        raise UsageError("a class-map router needs the experts' class count or class names.")
    routes = [names.index(source)] * len(class_names)
    for key, expert in mapping.items():
        key = str(key)
        if key in class_names:
            c = class_names.index(key)
        elif key.isdigit() and int(key) < len(class_names):
            c = int(key)
        else:
            raise UsageError(
                f"class_map: {key!r} is not a class (classes: {', '.join(class_names)})."
            )
        if expert not in names:
            raise UsageError(
                f"class_map: {expert!r} is not a registered expert ({', '.join(names)})."
            )
        routes[c] = names.index(expert)
    return routes


def build_router(experts: dict, settings: dict, *, seed: int = 0, info=None) -> RouterModel:
    """A fresh router over ``experts`` (name -> Expert, in order) from [router] settings.

    With ``class_map`` it is a class-map router: a whole copy of one classifier expert (its
    architecture and normalisation; ``init``, else the expert at sigma_e) whose predicted class
    picks the expert, so there is nothing to train.
    """
    if not experts:
        raise UsageError("no experts are registered: add one with `router add-expert` first.")
    kind = router_kind(settings)
    class_map = settings.get("class_map")
    copy = kind in ("class-map", *GATE_KINDS)  # a whole copy of one classifier expert
    init = class_map_source(experts, settings) if copy else settings.get("init")
    if init and init not in experts:
        raise UsageError(f"router init {init!r} is not a registered expert.")
    first = experts[init] if init else next(iter(experts.values()))  # normalisation source
    config = getattr(first, "config", None)
    if copy and settings.get("denoiser"):
        raise UsageError(f"a {kind} router takes no denoiser: it copies a classifier expert.")
    if kind in GATE_KINDS:
        sigmas = [e.sigma for e in experts.values()]
        gate = settings.get("gate") or {
            "thresholds": [1.0] * (len(experts) - 1),  # unfitted: all to the largest sigma
            "order": gates.default_order(sigmas),
        }
        shape = {"arch": config.arch, "arch_args": config.arch_args, "mean": config.mean,
                 "std": config.std, "gate": {**gate, "classes": config.num_classes}}  # fmt: skip
    elif class_map:
        class_names = (
            list(config.class_names)
            or list((info or {}).get("class_names") or [])
            or [str(c) for c in range(config.num_classes)]
        )
        routes = resolve_class_map(class_map, list(experts), class_names, init)
        shape = {"arch": config.arch, "arch_args": config.arch_args, "mean": config.mean,
                 "std": config.std, "class_map": routes}  # fmt: skip
    else:
        shape = {
            "arch": settings["arch"],
            "arch_args": settings.get("arch_args") or {},
            "mean": settings.get("mean") or getattr(config, "mean", None),
            "std": settings.get("std") or getattr(config, "std", None),
        }
    unet, scheduler = _router_denoiser(settings.get("denoiser"), experts)
    router = RouterModel.create(
        seed=seed,
        expert_names=list(experts),
        sigmas=[e.sigma for e in experts.values()],
        fingerprints=[e.fingerprint for e in experts.values()],
        in_chans=first.input_shape[0],
        input_size=first.input_shape[1:],
        sigma_e=settings.get("sigma_e"),
        unet=unet,
        scheduler=scheduler,
        info=info,
        **shape,
    )
    if init:
        init_from_expert(router, experts[init], init, head=copy)
        router.info["init"] = init
    return router


def router_folder(ws) -> Path:
    return Path(ws.artifacts) / "router"


def train_workspace(
    ws,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    router_overrides: dict | None = None,
    train_overrides: dict | None = None,
    table_overrides: dict | None = None,
    ctx=None,
):
    """Tables (only missing columns are computed), then the router: (router, history, folder).

    With a ``rsrouter.distributed`` context the missing columns are shared among the ranks and
    rank 0 alone trains; the other ranks return None.
    """
    from rsrouter.router.tables import table_settings, workspace_dataset, workspace_tables
    from rsrouter.runtime import resolve_device

    device = ctx.device(device) if ctx is not None else resolve_device(device)
    config = RouterTrainConfig.from_settings(ws.settings("train"), **(train_overrides or {}))
    settings = router_settings(ws, **(router_overrides or {}))
    if router_kind(settings) in GATE_KINDS:
        raise UsageError(
            "a gate router is fitted on the val split: use `router train --kind gate` "
            "(rsrouter.composition.tuning.train_gate_workspace)."
        )
    experts = ws.load_experts(device=device)
    folder = router_folder(ws)
    if settings.get("class_map"):  # fixed routes: no radius tables, nothing to train
        if ctx is not None and not ctx.is_main:
            return None
        dataset = workspace_dataset(ws, table_settings(ws, **(table_overrides or {}))["split"])
        info = {"dataset": dataset.name, "class_names": list(dataset.class_names)}
        router = build_router(experts, settings, info=info)
        return router, [], router.eval().save_pretrained(folder)
    check_head_only(config, settings.get("init"))  # before the tables are built
    table, dataset = workspace_tables(
        ws, experts=experts, device=device, progress=progress, ctx=ctx, **(table_overrides or {})
    )
    if ctx is not None and not ctx.is_main:
        return None
    router = build_router(
        experts,
        settings,
        seed=config.seed,
        info={"dataset": dataset.name, "class_names": list(dataset.class_names)},
    )
    history = train_router(
        router, table, dataset.images, folder, config, device=device, progress=progress
    )
    return router, history, folder
