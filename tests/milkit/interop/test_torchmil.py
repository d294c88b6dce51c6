"""milkit models under torchmil's interface and Trainer (skipped without torchmil)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchmil")
torchmetrics = pytest.importorskip("torchmetrics")

from torchmil.data import collate_fn  # noqa: E402
from torchmil.models import MILModel as TorchmilModel  # noqa: E402
from torchmil.utils.trainer import Trainer  # noqa: E402

from milkit import models  # noqa: E402
from milkit.interop.torchmil import TorchmilAdapter  # noqa: E402
from tests.milkit.training._train_helpers import planted_bags  # noqa: E402


class _Bags(torch.utils.data.Dataset):
    """torchmil's bag format: a dict per bag with ``X`` (N, D) and ``Y`` (scalar)."""

    def __init__(self, bags, labels):
        self.bags, self.labels = bags, labels

    def __len__(self):
        return len(self.bags)

    def __getitem__(self, i):
        return {"X": torch.from_numpy(self.bags[i]), "Y": torch.tensor(int(self.labels[i]))}


class _Logger:
    def __init__(self):
        self.rows = []

    def log(self, metrics):
        self.rows.append(dict(metrics))


def _abmil(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return models.create("abmil", 8, num_classes, fc_dim=16, attn_dim=8)


def test_adapter_is_a_torchmil_model_with_exact_binary_probabilities():
    model = _abmil()
    adapter = TorchmilAdapter(model).eval()
    assert isinstance(adapter, TorchmilModel)
    x = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    y_pred = adapter(x, mask)
    assert y_pred.shape == (3,)
    ref = torch.softmax(model(x, mask=mask.bool()).logits, dim=-1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(y_pred), ref)
    # padding does not change the padded bag's prediction
    alone = adapter(x[1:2, :4], None)
    torch.testing.assert_close(alone, y_pred[1:2], atol=1e-5, rtol=1e-5)


def test_compute_loss_is_milkit_cross_entropy_and_predict_shapes():
    adapter = TorchmilAdapter(_abmil(num_classes=3)).eval()
    x = torch.randn(2, 5, 8)
    y = torch.tensor([2.0, 0.0])  # torchmil datasets often hold float labels
    y_pred, losses = adapter.compute_loss(y, x)
    assert y_pred.shape == (2, 3) and list(losses) == ["ABMIL_loss"]
    expected = torch.nn.functional.cross_entropy(y_pred, y.long())
    torch.testing.assert_close(losses["ABMIL_loss"], expected)
    bag, inst = adapter.predict(x, return_inst_pred=True)
    assert bag.shape == (2, 3) and inst.shape == (2, 5)
    torch.testing.assert_close(inst.sum(dim=1), torch.ones(2))  # ABMIL attention sums to 1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        adapter.compute_loss(torch.tensor([3]), x[:1])
    with pytest.raises(ValueError, match="class indices"):
        adapter.compute_loss(torch.tensor([0.5]), x[:1])
    with pytest.raises(TypeError, match="milkit MILModel"):
        TorchmilAdapter(torch.nn.Linear(2, 2))


def test_torchmil_trainer_trains_a_milkit_model():
    bags, labels = planted_bags(n_bags=32, dim=8, seed=0, shift=4.0)
    train = torch.utils.data.DataLoader(
        _Bags(bags, labels), batch_size=4, shuffle=True, collate_fn=collate_fn
    )
    adapter = TorchmilAdapter(_abmil())
    logger = _Logger()
    trainer = Trainer(
        adapter,
        torch.optim.Adam(adapter.parameters(), lr=5e-3),
        metrics_dict={"accuracy": torchmetrics.Accuracy(task="binary")},
        device="cpu",
        logger=logger,
        disable_pbar=True,
        verbose=False,
    )
    trainer.train(max_epochs=20, train_dataloader=train)
    losses = [row["train/loss"] for row in logger.rows if "train/loss" in row]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    best = trainer.get_best_model()
    assert best is adapter
    batch = next(iter(torch.utils.data.DataLoader(_Bags(bags, labels), 5, collate_fn=collate_fn)))
    best.eval()
    bag, inst = best.predict(batch["X"], batch["mask"], return_inst_pred=True)
    assert bag.shape == (5,) and inst.shape == batch["X"].shape[:2]
    assert bool((inst[batch["mask"] == 0] == 0).all())  # padding gets no attention
    acc = ((torch.sigmoid(bag) > 0.5).long() == batch["Y"]).float().mean()
    assert float(acc) >= 0.8


def test_models_with_step_updates_need_the_optimizer_attached():
    torch.manual_seed(0)
    model = models.create("mhim-abmil", 8, 2)
    adapter = TorchmilAdapter(model).train()
    x, y = torch.randn(1, 12, 8), torch.tensor([1])
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        adapter.compute_loss(y, x)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    adapter.attach_optimizer(optimizer, total_steps=10)
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    _, losses = adapter.compute_loss(y, x)
    sum(losses.values()).backward()
    optimizer.step()
    assert adapter._steps_done == 1
    moved = [not torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters())]
    assert any(moved)  # the EMA teacher followed the student after the step
