from lightning.pytorch.loggers import CSVLogger, WandbLogger

from loki_exp.loggers import build_loggers, close_loggers, log_final_metrics


def test_csv_always_and_wandb_when_configured(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # tests never reach W&B
    out = f"paths.output_dir={tmp_path}"
    plain = build_loggers(compose_cfg("logger=csv", out), tmp_path / "a")
    assert [type(lg) for lg in plain] == [CSVLogger]
    loggers = build_loggers(compose_cfg("logger=wandb", "quota=30", out), tmp_path / "sweep" / "3")
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    wb = loggers[1]
    assert wb._wandb_init["group"] == "sweep" and wb._wandb_init["name"] == "loki-layer_balanced-q30"
    assert wb._wandb_init["config"]["quota"] == 30
    log_final_metrics(loggers, {"forgetting/avg": 1.5, "task/bfcl/accuracy/after": 0.4})
    close_loggers(loggers, "success")
    assert "forgetting/avg" in (tmp_path / "sweep" / "3" / "csv" / "metrics.csv").read_text()
