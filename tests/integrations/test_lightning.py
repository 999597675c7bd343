"""`LoraPlanLightningCallback` (`lora_planner.integrations.lightning`) in a real Lightning 2.x fit on CPU, the tracker
standing in for the CUDA counters: the record written and the planner within 0.5 % of every phase."""

from __future__ import annotations

import pytest

from lora_planner.integrations.meter import PHASES
from lora_planner.profiler.records import read_records

from tests.integrations.tiny import TokenDataset, lora, tiny_llama

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")


class Module(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3, fused=True)


def test_lightning_fit(tmp_path):
    from lora_planner.integrations import LoraPlanLightningCallback, TrackerCounters

    model = lora(tiny_llama())
    counters, out = TrackerCounters(), tmp_path / "runs.jsonl"
    callback = LoraPlanLightningCallback(args={"optim": "adamw_torch_fused"}, steps=3, out=str(out),
                                         counters=counters, log=lambda line: None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=2)
    counters.register_model(model)
    with counters:
        trainer.fit(Module(model), loader)
    meter = callback.meter
    assert meter.done and len(meter.measured) == 3 and meter.setup.training.method == "lora"
    predicted = meter.predicted_phases()
    for phase in PHASES:
        assert abs(predicted[phase] / meter.measured[-1][phase] - 1) < 0.005, (phase, predicted, meter.measured[-1])
    (record,), _ = read_records(out)
    assert record["source"] == "integration" and record["measured"]["phases"]["backward"]["peak_bytes"] > 0
