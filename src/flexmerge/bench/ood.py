"""Out-of-distribution tasks served by a merged bundle (FlexMerge, Dhasade et al., ICLR 2026,
Appendix C.6, Tables 5 and 6).

The merged model holds the eight text8 tasks; an OOD task is one it was not merged from (the six
other data sets of ``../shared/datasets/text``). The paper predicts an OOD task with the task's
own classification head on the features of every task branch of the merged model, ensembling the
branches, and compares with the best single fine-tuned expert under the same head. Here:

* **Features:** the all-MiniLM-L6-v2 sentence embedding of a branch: the mean of the last hidden
  states over the non-padding tokens, L2-normalised (the model's own pooling; the BERT pooler is
  task-specific in text8 and is not used).
* **Head:** one linear probe per OOD task, fitted on the *pretrained* encoder's features of the
  task's training examples (multinomial logistic regression, ``l2`` penalty, full-batch L-BFGS,
  :class:`LinearProbe`); never on test examples. The same head serves every branch, every merged
  model and every expert, so only the encoder changes.
* **Ensemble:** :meth:`flexmerge.MultiTaskModel.ensemble`: the mean of the branches' softmax
  probabilities.
* **References:** the pretrained encoder with the head (what the head was fitted on), and the
  fine-tuned experts with the head (at size N the bundle's branches *are* the experts, so their
  per-branch accuracies are the experts' accuracies; the best of them is the paper's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import FlexMergeError
from .datasets import LabeledTexts
from .evaluate import eval_batches


def sentence_features(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [rows, seq, dim]`` over the tokens where ``mask`` is 1, L2-normalised."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@dataclass
class LinearProbe:
    """Multinomial logistic regression ``softmax(x W^T + b)``: weights fitted by minimising the
    mean cross-entropy plus ``l2 * ||W||^2`` with full-batch L-BFGS (strong Wolfe line search)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float = 1e-4,
            max_iter: int = 500) -> "LinearProbe":
        if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
            raise FlexMergeError(f"probe: {features.shape[0]} feature rows for {labels.shape[0]} labels")
        x, labels = features.clone().double(), labels.clone()  # plain tensors, even from inference mode
        w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w.T + b, labels) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(w.detach().float(), b.detach().float())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias


@torch.inference_mode()
def encoder_features(encoder, tokenizer, data: LabeledTexts, *, max_seq_len: int = 64,
                     batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of ``data`` under an HF encoder (any model returning
    ``last_hidden_state`` or ``hidden_states``)."""
    feats, labels = [], []
    encoder.eval()
    for x, mask, y in eval_batches(tokenizer, data, max_seq_len=max_seq_len, batch_size=batch_size):
        out = encoder(input_ids=x, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
        feats.append(sentence_features(hidden, mask))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.inference_mode()
def branch_predictions(mt, probe: LinearProbe, tokenizer, data: LabeledTexts, tasks: Iterable[str], *,
                       max_seq_len: int = 64, batch_size: int = 32) -> tuple[dict[str, torch.Tensor],
                                                                             torch.Tensor, torch.Tensor]:
    """Run ``data`` through every branch ``tasks`` of the :class:`~flexmerge.MultiTaskModel` ``mt``
    with ``probe`` as the head: ``({task: predicted labels}, ensemble's predicted labels, labels)``.
    ``batch_size`` rows per branch (the mixed batch holds ``len(tasks)`` times as many)."""
    tasks = list(tasks)
    per_branch: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    ens, labels = [], []
    for x, mask, y in eval_batches(tokenizer, data, max_seq_len=max_seq_len, batch_size=batch_size):
        logits: dict[str, torch.Tensor] = {}

        def head(task, out, mask=mask):
            logits[task] = probe.logits(sentence_features(out.hidden_states[-1], mask))
            return logits[task]

        probs = mt.ensemble({"input_ids": x, "attention_mask": mask, "output_hidden_states": True},
                            head, tasks=tasks)
        for t in tasks:
            per_branch[t].append(logits[t].argmax(-1))
        ens.append(probs.argmax(-1))
        labels.append(y)
    return ({t: torch.cat(v) for t, v in per_branch.items()}, torch.cat(ens), torch.cat(labels))


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())
