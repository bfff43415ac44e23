"""Finetuning one classifier under the router's sigma (the paper's §5.2.2).

An expert family is one classifier used at several sigma (a "denoised" expert registered at
several σ shares its UNet and classifier). Each training input x goes to the sigma σ(x) the
router picks for it (its smoothed majority vote); the shared classifier is trained with
cross-entropy on expert_σ(x)(x + δ), δ ~ N(0, σ(x)²I), i.e. on the denoised image at that
sigma. The denoiser stays frozen. Inputs routed outside the family are not used. Gaussian
experts (a classifier of their own each, one sigma) are finetuned together the same way: each
classifier on the inputs routed to it, at its sigma (registered as <name>-sigma<σ>).

Taught to abstain (``teach_abstain``, design e of the routing issue): the sigma_max expert is
trained at its own sigma on the radius table's rows, with cross-entropy on the label, except on
the rows where it is wrong (R = 0) and an expert of a smaller sigma certifies: there the target
is the uniform distribution, so its votes scatter and its entropy rises. A gate router copies
that expert and routes by its entropy, so those inputs go to the smaller sigma.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from rsrouter.errors import UsageError
from rsrouter.io import sha256_json
from rsrouter.progress import progress_bar
from rsrouter.registry.workspace import NAME
from rsrouter.router.model import RouterModel
from rsrouter.smoothing import check_count, sample_counts

ROUTE_STAGE = 8  # noise stage of the router's votes here (tables use 4, certification 0-3)


@dataclass(frozen=True)
class FinetuneConfig:
    """Paper (CIFAR-10): 15 epochs, batch 128, AdamW lr 2e-5, wd 0.01."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-5
    weight_decay: float = 0.01
    route_n: int = 32  # router votes per input to pick σ(x)
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "route_n"):
            check_count(name, getattr(self, name))
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError("lr must be positive and weight_decay non-negative.")

    def to_dict(self) -> dict:
        return asdict(self)


def route(
    router: RouterModel,
    images: torch.Tensor,
    *,
    n: int,
    seed: int,
    indices=None,
    batch_size: int = 1000,
    device=None,
    progress=None,
) -> torch.Tensor:
    """The expert index the smoothed router votes for on each input (majority of n draws)."""
    router.eval()
    counts = sample_counts(
        router,
        images,
        router.sigma_e,
        n,
        seed=seed,
        indices=indices,
        stage=ROUTE_STAGE,
        batch_size=batch_size,
        device=device,
        num_classes=router.num_classes,
        progress=progress,
    )
    return counts.argmax(dim=1)


def classifier_groups(family: Mapping) -> list[tuple[torch.nn.Module, list[str]]]:
    """The family's classifiers, each with the members that use it: members whose classifiers
    hold equal weights are tied to one module (one model registered at several sigma); the
    others (Gaussian experts, one sigma each) keep their own."""
    if not family:
        raise UsageError("name at least one expert to finetune.")
    groups: list[tuple[torch.nn.Module, list[str]]] = []
    for name, expert in family.items():
        state = expert.classifier.state_dict()
        for module, members in groups:
            other = module.state_dict()
            if module is expert.classifier or (
                other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)
            ):
                expert.classifier = module
                members.append(name)
                break
        else:
            groups.append((expert.classifier, [name]))
    return groups


def finetune_family(
    family: Mapping,
    router: RouterModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen)
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    indices=None,
) -> dict:
    """Train the family's classifiers in place, each on the inputs routed to its members.

    A classifier shared by several members (one model at several sigma) is trained on all their
    inputs, each at its member's sigma; experts with classifiers of their own (Gaussian experts)
    are each trained on theirs, in the same batches. ``indices`` (dataset indices of
    ``images``) seed the router's votes per input.

    Returns {"routed": inputs per member, "groups": the members of each classifier,
    "history": mean loss per epoch}.
    """
    unknown = [name for name in family if name not in router.expert_names]
    if unknown:
        raise UsageError(f"the router does not route to {', '.join(unknown)}.")
    groups = classifier_groups(family)
    device = torch.device(device)
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    with progress_bar("route inputs", len(images) * config.route_n, enabled=progress) as adv:
        choice = route(
            router.to(device),
            images,
            n=config.route_n,
            seed=config.seed,
            indices=indices if indices is not None else range(len(images)),
            device=device,
            progress=adv,
        )
    member_of = {router.expert_names.index(name): name for name in family}
    rows = torch.nonzero(torch.isin(choice, torch.tensor(list(member_of)))).flatten()
    routed = {name: int((choice == i).sum()) for i, name in member_of.items()}
    idle = [", ".join(m) for _, m in groups if not sum(routed[n] for n in m)]
    if idle:
        raise UsageError(f"the router sends no training input to {'; '.join(idle)}: leave "
                         "it out of the experts to finetune.")  # fmt: skip
    experts = {i: family[name].to(device) for i, name in member_of.items()}
    for e in experts.values():
        if e.denoiser is not None:
            e.denoiser.requires_grad_(False)
    bf16 = device.type == "cuda"

    def batch_loss(positions, noise_gen):
        batch = rows[positions]
        x, y, c = images[batch], labels[batch], choice[batch]
        noise = torch.randn(x.shape, generator=noise_gen)
        loss = torch.zeros((), device=device)
        for i, expert in experts.items():
            mask = c == i
            if not mask.any():
                continue
            noisy = (x[mask] + expert.sigma * noise[mask]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = expert(noisy)
            loss = loss + F.cross_entropy(logits.float(), y[mask].to(device), reduction="sum")
        return loss / len(batch)

    classifiers = torch.nn.ModuleList(module for module, _ in groups)
    history = _train(classifiers, len(rows), batch_loss, config, "finetune", progress)
    return {"routed": routed, "groups": [m for _, m in groups], "history": history}


def _train(classifier, size: int, batch_loss, config: FinetuneConfig, what: str, progress):
    """AdamW on ``classifier`` over ``size`` inputs for config.epochs, in batches shuffled per
    epoch; ``batch_loss(positions, noise generator)`` is a batch's mean loss. The shuffle and the
    noise of each epoch are seeded by (config.seed, epoch). Returns the mean loss per epoch."""
    opt = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = []
    steps = config.epochs * -(-size // config.batch_size)
    with progress_bar(what, steps, enabled=progress) as advance:
        for epoch in range(1, config.epochs + 1):
            seeds = [int(sha256_json([config.seed, epoch, s])[:15], 16) for s in (0, 1)]
            shuffle, noise = (torch.Generator().manual_seed(seed) for seed in seeds)
            total = 0.0
            classifier.train()  # a frozen denoiser stays in eval mode
            for positions in torch.randperm(size, generator=shuffle).split(config.batch_size):
                loss = batch_loss(positions, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(positions)
                advance(1)
            history.append(total / size)
    classifier.eval()
    return history


def smaller_sigmas(sigmas, expert: int) -> list[int]:
    """The experts of a smaller sigma than ``expert``'s (refused when there is none)."""
    smaller = [j for j, s in enumerate(sigmas) if s < sigmas[expert]]
    if not smaller:
        raise UsageError(
            f"no expert has a smaller sigma than {sigmas[expert]:g}: an expert is taught to "
            "abstain where a smaller sigma is right."
        )
    return smaller


def abstain_rows(radii: torch.Tensor, sigmas, expert: int) -> torch.Tensor:
    """Rows (of a radius table) where ``expert`` is wrong or abstains (R = 0) and an expert of a
    smaller sigma certifies (R > 0): the inputs it should leave to a smaller sigma."""
    smaller = smaller_sigmas(sigmas, expert)
    return (radii[:, expert] == 0) & (radii[:, smaller] > 0).any(dim=1)


def teach_abstain(
    expert,
    images: torch.Tensor,
    labels: torch.Tensor,
    abstain: torch.Tensor,
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen)
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Train ``expert``'s classifier in place on x + δ, δ ~ N(0, sigma^2 I): cross-entropy on
    the label, and on the ``abstain`` rows cross-entropy to the uniform distribution.

    Returns {"rows": inputs, "abstain": abstain rows, "history": mean loss per epoch}.
    """
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    abstain = torch.as_tensor(abstain, dtype=torch.bool)
    if not len(images) == len(labels) == len(abstain):
        raise UsageError("images, labels and abstain rows must have one entry per input.")
    if not abstain.any():
        raise UsageError("no input to abstain on: no table row is wrong for this expert and "
                         "certified by a smaller sigma.")  # fmt: skip
    device = torch.device(device)
    expert = expert.to(device)
    if getattr(expert, "denoiser", None) is not None:
        expert.denoiser.requires_grad_(False)

    def batch_loss(batch, noise_gen):
        x = images[batch]
        noisy = (x + expert.sigma * torch.randn(x.shape, generator=noise_gen)).to(device)
        logp = F.log_softmax(expert(noisy).float(), dim=-1)
        label_ce = F.nll_loss(logp, labels[batch].to(device), reduction="none")
        uniform_ce = -logp.mean(dim=-1)
        return torch.where(abstain[batch].to(device), uniform_ce, label_ce).mean()

    history = _train(expert.classifier, len(images), batch_loss, config, "teach to abstain",
                     progress)  # fmt: skip
    return {"rows": len(images), "abstain": int(abstain.sum()), "history": history}


# ---------------------------------------------------------------- workspace level


def family_name(names, suffix: str = "ft") -> str:
    """The common stem of a family's names ("dds-sigma0.25", "dds-sigma1" -> "dds") + "-ft"."""
    stems = {re.sub(r"-sigma[0-9.e+-]+$", "", n) for n in names}
    stem = stems.pop() if len(stems) == 1 else "family"
    return f"{stem}-{suffix}"


def finetune_workspace(
    ws,
    names: list[str],
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008 (frozen)
    *,
    name: str | None = None,
    replace: bool = True,
    retrain: bool = False,
    abstain: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    train_overrides: dict | None = None,
) -> dict:
    """Finetune the family ``names`` under the workspace router; register the result.

    With ``abstain``, ``names`` is one expert, taught to abstain where a smaller sigma is right
    (``teach_abstain`` on the workspace's radius table; no router needed).

    The new expert folder goes to ``<artifacts>/experts/<name>``, registered at the family's
    sigmas (replacing the old entries in place when ``replace``). With ``retrain``, the table
    columns of the new experts are built and the router retrained: router → finetune → router.
    """
    from rsrouter.router.train import GATE_KINDS, router_kind, router_settings, train_workspace
    from rsrouter.runtime import resolve_device

    if not names or len(set(names)) != len(names):
        raise UsageError("name each expert of the family once.")
    if abstain and len(names) != 1:
        raise UsageError("--abstain teaches one expert to abstain: name exactly one.")
    if retrain and router_kind(router_settings(ws)) in GATE_KINDS:
        raise UsageError("a gate router is refitted on the val split, not retrained here: run "
                         "`router train` after finetuning.")  # fmt: skip
    device = resolve_device(device)
    router = None if abstain else _workspace_router(ws, device)
    experts = ws.load_experts(device=device)
    if router is not None:
        router.check_experts(list(experts), [e.fingerprint for e in experts.values()])
    family = {n: experts[n] for n in names if n in experts}
    missing = [n for n in names if n not in experts]
    if missing:
        raise UsageError(f"no expert named {', '.join(missing)} in {ws.path}.")
    if abstain:  # before the table's columns are built
        smaller_sigmas([e.sigma for e in experts.values()], list(experts).index(names[0]))
    new = name or family_name(names, "abstain" if abstain else "ft")
    if not NAME.match(new):  # it names a folder too: checked before anything is written
        raise UsageError(
            f"expert name {new!r} must start with a letter or digit and use only letters, "
            "digits, '.', '_' and '-'."
        )
    stay = [n for n in ws.names if not (replace and n in family)]
    taken = [n for n in stay if n == new or n.startswith(f"{new}-sigma")]
    if taken:  # refused before finetuning, and before <artifacts>/experts/<new> is overwritten
        raise UsageError(f"expert(s) {', '.join(taken)} already registered: choose another --name.")
    if abstain:
        result, record = abstain_in_workspace(ws, names[0], experts, config, device, progress)
    else:
        result, record = _finetune_in_workspace(ws, family, router, config, device, progress)
    groups = result.get("groups") or [list(names)]
    # one classifier: registered as ``new`` (at each of its sigma); several: <new>-sigma<σ> each
    targets = [(new, g) for g in groups] if len(groups) == 1 else [
        (f"{new}-sigma{'-'.join(f'{family[n].sigma:g}' for n in g)}", g) for g in groups
    ]  # fmt: skip
    positions = [ws.names.index(n) for n in names]
    before = list(ws.experts)
    entries_of, folders = {}, []
    try:
        if replace:
            for n in names:
                ws.remove_expert(n)
        for target, members in targets:
            first = family[members[0]]
            training = {**first.config.training, "finetune": record}
            first.config = dataclasses.replace(first.config, training=training)
            out = first.save_pretrained(Path(ws.artifacts) / "experts" / target)
            folders.append(str(out))
            sigmas = [family[n].sigma for n in members]
            added = ws.add_expert(str(out), sigmas if len(sigmas) > 1 else sigmas[0], name=target)
            entries_of.update(zip(members, added, strict=True))
    except UsageError:  # e.g. a bad name: the family must not stay removed
        ws.experts = before
        ws.save()
        raise
    entries = [entries_of[n] for n in names]
    if replace:  # put the new experts where the old ones were: router output order is stable
        for entry in entries:
            ws.experts.remove(entry)
        for pos, entry in sorted(zip(positions, entries, strict=True), key=lambda p: p[0]):
            ws.experts.insert(pos, entry)
        ws.save()
    result["registered"] = [e.name for e in entries]
    result["folder"] = ", ".join(folders)
    if retrain:
        _, history, router_dir = train_workspace(
            ws, device=device, progress=progress, train_overrides=train_overrides
        )
        result["router_history"] = history
        result["router"] = str(router_dir)
    return result


def _workspace_router(ws, device) -> RouterModel:
    from rsrouter.router.train import router_folder

    folder = router_folder(ws)
    if not (folder / "config.json").is_file():
        raise UsageError("no trained router in this workspace: run `router train` first.")
    return RouterModel.from_pretrained(folder, device=device)


def _finetune_in_workspace(ws, family, router, config, device, progress):
    """finetune_family on the table rows of the [tables] split: (result, provenance record)."""
    from rsrouter.router.tables import subset_indices, table_settings, workspace_dataset

    t = table_settings(ws)
    dataset = workspace_dataset(ws, t["split"])
    rows = subset_indices(len(dataset.labels), t["subset"], t["seed"])
    result = finetune_family(
        family,
        router,
        dataset.images[rows],
        dataset.labels[rows],
        config,
        device=device,
        progress=progress,
        indices=[int(i) for i in rows],
    )
    record = {"finetuned_from": list(family), "router": router.fingerprint, **config.to_dict(),
              "routed": result["routed"], "loss": result["history"]}  # fmt: skip
    return result, record


def abstain_in_workspace(ws, name, experts, config, device=None, progress=True):
    """teach_abstain ``experts[name]`` in place on the workspace's radius table (missing columns
    of ``experts`` are built first): (result, provenance record)."""
    from rsrouter.router.tables import workspace_tables
    from rsrouter.runtime import resolve_device

    device = resolve_device(device)
    table, dataset = workspace_tables(ws, experts=experts, device=device, progress=progress)
    mask = abstain_rows(table.radii, table.sigmas, table.names.index(name))
    result = teach_abstain(experts[name], dataset.images[table.indices], table.labels, mask,
                           config, device=device, progress=progress)  # fmt: skip
    record = {"finetuned_from": [name], "abstain": {"rows": result["rows"],
              "abstain_rows": result["abstain"], "table": {"n": table.n, "alpha": table.alpha,
              "subset": table.subset, "seed": table.seed}}, **config.to_dict(),
              "loss": result["history"]}  # fmt: skip
    return result, record
