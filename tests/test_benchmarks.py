"""The GPU benchmarks' own logic, checked on the CPU: the peer loop of Cohen et al. (the
Carlini pipeline's peer row) counts every draw and certifies as CERTIFY does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rsrouter.smoothing import certified_radius

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "carlini_pipeline.py"


@pytest.fixture(scope="module")
def carlini():
    spec = importlib.util.spec_from_file_location("carlini_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Fixed(torch.nn.Module):
    """Logits for class ``top`` whatever the input (every draw votes for it)."""

    def __init__(self, top: int, classes: int = 10):
        super().__init__()
        self.top, self.classes = top, classes

    def forward(self, x):
        out = torch.zeros((len(x), self.classes))
        out[:, self.top] = 1.0
        return out


class FirstPixelSign(torch.nn.Module):
    """Class 1 where the first pixel is positive, else 0: p(1) = Phi(x0 / sigma)."""

    def forward(self, x):
        positive = (x.flatten(1)[:, 0] > 0).float()
        return torch.stack([1 - positive, positive], dim=1)


def test_peer_loop_counts_every_draw_and_certifies_as_certify(carlini):
    xs = torch.zeros((2, 1, 4, 4))
    counts = carlini.peer_counts(Fixed(3), xs[0], 0.5, 2_345, 1_000, 10)
    assert counts.sum() == 2_345 and counts[3] == 2_345
    out = carlini.peer_certify(Fixed(3), xs, 0.5, n0=10, n=2_345, alpha=0.001, batch_size=1000,
                               classes=10)  # fmt: skip
    radius = certified_radius(2_345, 2_345, 0.5, 0.001)
    assert out == [(3, pytest.approx(radius))] * 2


def test_peer_loop_abstains_at_a_coin_flip_and_certifies_far_from_it(carlini):
    torch.manual_seed(0)
    coin = torch.zeros((1, 1, 2, 2))  # p(1) = 1/2: the lower bound stays below 1/2
    far = torch.full((1, 1, 2, 2), 3.0)  # p(1) = Phi(3 / 0.5): a miss has odds below 1e-9
    kw = dict(sigma=0.5, n0=50, n=2_000, alpha=0.001, batch_size=300, classes=2)
    assert carlini.peer_certify(FirstPixelSign(), coin, **kw) == [(-1, 0.0)]
    [(top, radius)] = carlini.peer_certify(FirstPixelSign(), far, **kw)
    assert top == 1 and radius == pytest.approx(certified_radius(2_000, 2_000, 0.5, 0.001))


def test_certify_overhead_refuses_an_unknown_model_in_one_sentence(capsys):
    spec = importlib.util.spec_from_file_location(
        "certify_overhead", SCRIPT.with_name("certify_overhead.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as refused:
        module.main(["--arch", "nope"])
    assert refused.value.code == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err


def test_fit_decisions_benchmark_times_the_same_decisions(capsys):
    """benchmarks/fit_decisions.py prints a time only once both paths decided alike."""
    path = SCRIPT.with_name("fit_decisions.py")
    spec = importlib.util.spec_from_file_location("fit_decisions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--inputs", "30", "--candidates", "2", "--n", "200"]) == 0
    out = capsys.readouterr().out
    assert "Same decisions, input for input, under every rule." in out
    assert sum(line.startswith(("| min", "| pairwise", "| agreement")) for line in
               out.splitlines()) == 3  # fmt: skip
    for bad in (["--candidates", "0"], ["--inputs", "0"], ["--classes", "1"], ["--alpha", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            module.main(bad)
        assert exit_info.value.code == 2  # argparse's one-sentence usage error
