"""Each private upstream name loki_exp uses, against the installed packages; and a loud,
named failure when one moves."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from loki_exp import upstream


def test_lightning_precision_names():
    names = upstream.lightning_precisions()
    assert {"32-true", "bf16-mixed", "16-mixed", "bf16-true"} <= set(names)


def test_captum_quadrature_rules():
    supported, parameters = upstream.captum_quadrature()
    assert {"riemann_trapezoid", "gausslegendre", "riemann_right"} <= set(supported)
    step_sizes, alphas = parameters("riemann_trapezoid")
    assert alphas(5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Captum's trapezoid weights are 1/2n at the ends and 1/n inside (summing to (n-1)/n)
    assert step_sizes(5) == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.1])


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batches_processed_counts_the_fit_loop_s_batches(tmp_path):
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(_Tiny(), DataLoader(torch.ones(10, 1), batch_size=2))
    assert upstream.batches_processed(trainer) == 3


def test_a_moved_name_fails_with_one_message_naming_it(monkeypatch):
    import lightning.fabric.connector as connector

    monkeypatch.delattr(connector, "_PRECISION_INPUT_STR")
    with pytest.raises(upstream.UpstreamMoved,
                       match=r"lightning.fabric.connector._PRECISION_INPUT_STR is not where .* "
                             r"in lightning \d"):
        upstream.lightning_precisions()
    with pytest.raises(upstream.UpstreamMoved, match="batch_progress.current.processed"):
        upstream.batches_processed(object())
