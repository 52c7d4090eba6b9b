"""Out-of-distribution prediction: MultiTaskModel.ensemble against hand-computed per-branch
outputs, the linear probe against scipy's optimiser on the same objective, the sentence pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import write_checkpoint
from flexmerge import FlexMergeError, MultiTaskModel
from flexmerge.bench.ood import LinearProbe, sentence_features
from flexmerge.engine import FlexMerge

TASKS = ("a", "b", "c")


class Encoder(nn.Module):
    """Token embedding -> two linear layers; returns hidden states ``[rows, seq, d]``."""

    def __init__(self, d=6, vocab=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, d)

    def forward(self, ids):
        return self.l2(torch.tanh(self.l1(self.embed(ids))))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ood")
    torch.manual_seed(0)
    base = Encoder().state_dict()
    tasks = {}
    for i, t in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        tasks[t] = str(write_checkpoint(sd, tmp / t, "safetensors"))
    return {"base": str(write_checkpoint(base, tmp / "base", "safetensors")), "tasks": tasks,
            "method": "task_arithmetic"}


def _reference_outputs(bundle, task, ids):
    m = Encoder()
    m.load_state_dict(bundle.state_dict(task))
    with torch.no_grad():
        return m(ids)


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_ensemble_is_the_mean_over_branches(cfg, combine):
    fm = FlexMerge(cfg)
    plan = fm.plan()
    size = (plan.min_units + plan.max_units) / 2  # some blocks shared, some not
    bundle = fm.merge(size)
    mt = MultiTaskModel.from_bundle(bundle, model_factory=lambda: Encoder(), verify=False)
    ids = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))

    def head(task, out):
        return out.mean(1) @ w.T

    got = mt.ensemble(ids, head, combine=combine)
    parts = []
    for t in TASKS:
        logits = _reference_outputs(bundle, t, ids).mean(1) @ w.T
        parts.append(logits.softmax(-1) if combine == "probs" else logits)
    torch.testing.assert_close(got, sum(parts) / 3, atol=1e-5, rtol=0)
    # the branches differ at this size, so the ensemble is not any single branch
    assert not torch.allclose(parts[0], parts[1])
    # a subset of the branches, duplicates counted once
    sub = mt.ensemble(ids, head, tasks=["c", "a", "c"], combine=combine)
    torch.testing.assert_close(sub, (parts[0] + parts[2]) / 2, atol=1e-5, rtol=0)


def test_ensemble_rejects_bad_heads_and_tasks(cfg):
    fm = FlexMerge(cfg)
    mt = MultiTaskModel.from_bundle(fm.merge(1.0), model_factory=lambda: Encoder(), verify=False)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(FlexMergeError, match="combine"):
        mt.ensemble(ids, lambda t, o: o.mean(1), combine="vote")
    with pytest.raises(FlexMergeError, match="logits"):
        mt.ensemble(ids, lambda t, o: o)  # 3-D, not [rows, classes]
    with pytest.raises(FlexMergeError, match="unknown task 'z'"):
        mt.ensemble(ids, lambda t, o: o.mean(1), tasks=["a", "z"])
    with pytest.raises(FlexMergeError, match="one class count"):
        mt.ensemble(ids, lambda t, o: o.mean(1)[:, : 2 + TASKS.index(t)])


def test_sentence_features_mean_over_real_tokens_then_unit_norm():
    hidden = torch.tensor([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # mean of the first two tokens = (2, 2) -> unit norm (1/sqrt2, 1/sqrt2); the padding is ignored
    torch.testing.assert_close(sentence_features(hidden, mask), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_probe_matches_scipy_on_the_same_objective():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=g) > 0).long() + (x[:, 1] > 1).long()
    l2 = 0.05
    probe = LinearProbe.fit(x, y, 3, l2=l2)
    X, Y = x.double().numpy(), y.numpy()

    def objective(theta):
        w, b = theta[:12].reshape(3, 4), theta[12:]
        z = X @ w.T + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(60), Y].mean() + l2 * (w * w).sum()

    ref = scipy_optimize.minimize(objective, np.zeros(15), method="BFGS", options={"gtol": 1e-10})
    torch.testing.assert_close(probe.weight.double(), torch.from_numpy(ref.x[:12].reshape(3, 4)), atol=1e-4, rtol=0)
    torch.testing.assert_close(probe.bias.double(), torch.from_numpy(ref.x[12:]), atol=1e-4, rtol=0)
    # separable data is learned
    sep = LinearProbe.fit(x, (x[:, 0] > 0).long(), 2, l2=1e-6)
    assert float((sep.logits(x).argmax(-1) == (x[:, 0] > 0).long()).float().mean()) == 1.0
