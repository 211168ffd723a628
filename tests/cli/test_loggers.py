from lightning.pytorch.loggers import CSVLogger, WandbLogger

from loki_exp.loggers import build_loggers, close_loggers, log_final_metrics


def test_csv_unless_turned_off_and_wandb_when_configured(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # tests never reach W&B
    out = f"paths.output_dir={tmp_path}"
    plain = build_loggers(compose_cfg("logger=csv", out), tmp_path / "a")
    assert [type(lg) for lg in plain] == [CSVLogger]
    assert build_loggers(compose_cfg("logger.csv=false", out), tmp_path / "b") == []
    job = tmp_path / "2026-11-30" / "23-55-38" / "3"
    loggers = build_loggers(compose_cfg("logger=wandb", "quota=30", out), job)
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    wb = loggers[1]
    assert wb._wandb_init["group"] == "2026-11-30_23-55-38"
    assert wb._wandb_init["name"] == "loki-layer_balanced-q30"
    assert wb._wandb_init["config"]["quota"] == 30
    log_final_metrics(loggers, {"forgetting/avg": 1.5, "task/bfcl/accuracy/after": 0.4})
    close_loggers(loggers, "success")
    assert "forgetting/avg" in (job / "csv" / "metrics.csv").read_text()


def test_wandb_offline_run_holds_config_metrics_and_group(compose_cfg, tmp_path, monkeypatch):
    """A real offline W&B run, read back from its run file (tests/support/wandb_records.py)."""
    from tests.support.wandb_records import run_file, run_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = tmp_path / "multirun" / "2026-11-30" / "23-55-38" / "4"
    cfg = compose_cfg("logger=wandb", "quota=30", "method=loki", f"paths.output_dir={job}")
    loggers = build_loggers(cfg, job)
    metrics = {"forgetting/avg": 1.5, "task/bfcl/accuracy/after": 0.4,
               "bench/arc_easy/acc_norm/delta/ci_low": -0.05}
    log_final_metrics(loggers, metrics)
    close_loggers(loggers, "success")
    run = run_summary(run_file(job))
    assert run["group"] == "2026-11-30_23-55-38" and run["name"] == "loki-layer_balanced-q30"
    assert run["config"]["quota"] == 30 and run["config"]["method"]["name"] == "loki"
    assert {k: run["summary"][k] for k in metrics} == metrics
    assert any(h.get("forgetting/avg") == 1.5 for h in run["history"])


def test_any_argument_of_a_logger_from_the_shell(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = build_loggers(compose_cfg(
        "logger=wandb", "+logger.wandb.tags=[loki,cpu]", "+logger.wandb.entity=lab",
        "logger.wandb.group=mine", "+logger.wandb.name=run7", "logger.csv.name=curve",
        f"paths.output_dir={tmp_path}"), tmp_path)
    csv, wb = loggers
    assert csv.name == "curve" and csv.save_dir == str(tmp_path)
    assert wb._wandb_init["tags"] == ["loki", "cpu"] and wb._wandb_init["entity"] == "lab"
    assert type(wb._wandb_init["tags"]) is list  # plain, as wandb.init expects (not a ListConfig)
    assert wb._wandb_init["group"] == "mine" and wb._wandb_init["name"] == "run7"
    assert wb._wandb_init["mode"] == "disabled" and wb._wandb_init["dir"] == str(tmp_path)
    assert build_loggers(compose_cfg("logger.csv=null", f"paths.output_dir={tmp_path}"),
                         tmp_path) == []
    _, elsewhere = build_loggers(compose_cfg("logger=wandb", f"+logger.wandb.dir={tmp_path / 'w'}",
                                             f"paths.output_dir={tmp_path}"), tmp_path)
    assert elsewhere._wandb_init["dir"] == str(tmp_path / "w")  # wandb.init's own name for it


def test_any_lightning_logger_from_the_shell(compose_cfg, tmp_path):
    loggers = build_loggers(compose_cfg(
        "logger.extra=[{_target_:lightning.pytorch.loggers.CSVLogger,name:extra}]",
        f"paths.output_dir={tmp_path}"), tmp_path)
    assert [type(lg) for lg in loggers] == [CSVLogger, CSVLogger]
    assert loggers[1].name == "extra" and loggers[1].save_dir == str(tmp_path)
