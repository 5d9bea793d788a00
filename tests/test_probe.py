"""The online linear probe (common.OnlineProbe): its first SGD step by hand, the features it reads, its two-process
average, and the features it computes itself where the backbone never sees whole images (MAE)."""

import pytest
import torch
from conftest import spawn
from torch import nn

import common
import simclr

CLASSES = 10  # the synthetic data set's


class Features(nn.Module):
    """A stand-in backbone: flattened pixels times a fixed matrix."""

    embed_dim = 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, self.embed_dim)

    def forward(self, x):
        return self.proj(x.flatten(1))


def make_probe(backbone, batch=4, total_steps=10, world=1, rank=0):
    args = simclr.get_args(["--dataset", "synthetic", "--img-size", "32", "--batch", str(batch), "--amp", "off"])
    return common.OnlineProbe(backbone, args, common.Env(torch.device("cpu"), world, rank), total_steps)


def first_step_by_hand(features, labels, lr):
    """Softmax regression from zero weights: the logits are 0, every class has probability 1/C, so the cross
    entropy's gradient is (1/C - onehot(y)) f^T averaged over the labelled rows; SGD's first momentum step is
    -lr times that gradient."""
    known = labels >= 0
    error = torch.full((len(labels), CLASSES), 1.0 / CLASSES)
    error[known.nonzero()[:, 0], labels[known]] -= 1
    error[~known] = 0
    count = known.sum()
    return -lr * error.T @ features / count, -lr * error.sum(0) / count


def test_first_step_by_hand_reads_the_first_training_call():
    torch.manual_seed(0)
    backbone = Features()
    rng = torch.get_rng_state()
    probe = make_probe(backbone)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws no random numbers, neither here
    assert probe.enabled and probe.head.weight.shape == (CLASSES, 6) and not probe.head.weight.any()
    x, other = torch.randn(8, 3, 2, 2), torch.randn(8, 3, 2, 2)  # two views of 4 images, concatenated
    labels = torch.tensor([3, 0, -1, 7])  # an unlabelled image is ignored
    backbone.eval()(other)  # evaluation calls are not training features
    backbone.train()(x)  # the step's first training call: its first 4 rows are the first view
    backbone(other)  # later calls in the step are ignored
    rng = torch.get_rng_state()
    online = probe.step([x[:4]], labels, 0)
    assert torch.equal(torch.get_rng_state(), rng)  # nor here
    weight, bias = first_step_by_hand(backbone(x)[:4].detach(), labels, lr=0.1 * 4 / 256)
    assert torch.allclose(probe.head.weight, weight, atol=1e-7) and torch.allclose(probe.head.bias, bias, atol=1e-7)
    # zero logits: argmax is class 0, right for one of the 3 labelled images
    assert online["online_train_top1"].item() == pytest.approx(100 / 3)
    assert all(p.grad is None for p in backbone.parameters())  # no gradient reaches the backbone


def test_the_lr_follows_a_cosine_over_the_run():
    probe = make_probe(Features(), batch=256, total_steps=10)
    for step, want in [(0, 0.1), (5, 0.05), (9, 0.1 * 0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi))).item())]:
        probe.backbone.train()(torch.randn(4, 3, 2, 2))
        probe.step([None], torch.tensor([1, 2, 3, 4]), step)
        assert probe.optimizer.param_groups[0]["lr"] == pytest.approx(want)


def test_features_are_computed_in_eval_mode_where_the_backbone_did_not_run():
    """MAE's encoder sees only the visible patches: the probe computes the first view's features itself, with no
    gradient, in eval mode (no dropout, no drop-path, no random numbers), and leaves the backbone in training mode."""
    torch.manual_seed(0)
    backbone = nn.Sequential(Features(), nn.Dropout(0.5))
    backbone.embed_dim = 6
    probe = make_probe(backbone)
    x, labels = torch.randn(4, 3, 2, 2), torch.tensor([1, 2, 3, 4])
    rng = torch.get_rng_state()
    probe.step([x], labels, 0)
    assert torch.equal(torch.get_rng_state(), rng) and backbone.training
    weight, _ = first_step_by_hand(backbone[0](x).detach(), labels, lr=0.1 * 4 / 256)
    assert torch.allclose(probe.head.weight, weight, atol=1e-7)


def test_off_without_labels_or_when_asked():
    args = simclr.get_args(["--dataset", "synthetic", "--online-probe", "0"])
    probe = common.OnlineProbe(Features(), args, common.Env(torch.device("cpu")), 10)
    assert not probe.enabled and probe.step([None], None, 0) == {} and probe.state_dict() is None
    assert probe.evaluate(None, None) == {}


def probe_after_steps(rank, world, features, labels):
    torch.manual_seed(0)
    backbone = Features()
    batch = len(labels[0])
    probe = make_probe(backbone, batch=batch, world=world, rank=rank)
    share = batch // world
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(3):
        backbone.train()(features[step][mine])
        probe.step([None], labels[step][mine], step)
    return probe.head.state_dict()


def test_two_processes_train_the_probe_of_one():
    """Each process steps on its half of the batch; averaging the gradients over the processes gives the weights
    one process reaches on the whole batch."""
    torch.manual_seed(1)
    features = [torch.randn(8, 3, 2, 2) for _ in range(3)]
    labels = [torch.randint(0, CLASSES, (8,)) for _ in range(3)]
    one = probe_after_steps(0, 1, features, labels)
    for two in spawn(probe_after_steps, 2, features, labels):
        assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
