"""Implant: the LoKI module, training only the selected rows, exporting a plain checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loki_exp.data.sft import SFTDataModule, encode_all
from loki_exp.data.tasks import load_task
from loki_exp.errors import LokiError
from loki_exp.implant import methods
from loki_exp.implant.fit import build_trainer, learning_rate
from loki_exp.implant.loki_linear import LoKILinear, apply_loki, merge_loki
from loki_exp.implant.module import CausalLMTuner
from loki_exp.model_access import down_projs
from tests.support.tolerances import assert_close_fp32


def test_row_linear_forward_is_bitwise_and_grads_match_autograd():
    torch.manual_seed(0)
    base = nn.Linear(12, 6, bias=True)
    ref = copy.deepcopy(base)
    rows = [1, 4]
    loki = LoKILinear(base, rows)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = loki(x), ref(x_ref)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    # Its own backward against autograd's (other matmul shapes): tests/support/tolerances.py.
    assert_close_fp32(x.grad, x_ref.grad, "input gradient")
    assert_close_fp32(loki.weight_rows.grad, ref.weight.grad[rows], "row gradients")
    assert_close_fp32(loki.bias_rows.grad, ref.bias.grad[rows], "bias gradients")
    assert base.weight.grad is None  # no full weight gradient


def test_row_linear_under_bf16_autocast():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False)
    ref = copy.deepcopy(base)
    loki = LoKILinear(base, [0, 3, 5])
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = loki(x), ref(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert loki.weight_rows.grad.dtype == torch.float32


def _batch(tokenizer, n=4):
    ids = tokenizer(["Call the weather API for Paris.", "Sum 2 and 3 please."] * (n // 2),
                    return_tensors="pt", padding=True).input_ids
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _fit(model, tokenizer, steps=3, lr=1e-2):
    tuner = CausalLMTuner(model, lr=lr, max_steps=steps, warmup_ratio=0.0)
    optimizer = tuner.configure_optimizers()["optimizer"]
    batch = _batch(tokenizer)
    for _ in range(steps):
        loss = tuner.response_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen"])
def test_three_steps_change_only_the_selected_rows(compose_cfg, name):
    from loki_exp.models import load_model

    loaded = load_model(compose_cfg(f"model={name}").model)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers, d_model = len(down_projs(model)), down_projs(model)[0].out_features
    positions = [[0, 5, d_model - 1], [2, 3]] + [[7]] * (n_layers - 2)
    apply_loki(model, positions)
    optimizer = _fit(model, loaded.tokenizer)
    # Optimizer state holds exactly the selected rows.
    shapes = sorted(tuple(s["exp_avg"].shape) for s in optimizer.state.values())
    assert shapes == sorted((len(p), down_projs(model)[0].in_features) for p in positions)
    merge_loki(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        layer = next((i for i in range(n_layers) if key == f"model.layers.{i}.mlp.down_proj.weight"),
                     None)
        if layer is None:
            assert torch.equal(after[key], value), key
            continue
        rows = positions[layer]
        frozen = torch.ones(value.shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(after[key][frozen], value[frozen]), key
        assert (after[key][rows] != value[rows]).all(dim=1).any(), key


@pytest.mark.parametrize("method", ["loki", "loki_lora", "lora", "dora", "pissa", "full"])
def test_every_method_trains_and_exports_a_plain_checkpoint(compose_cfg, tmp_path, method):
    from loki_exp.implant.export import export_checkpoint
    from loki_exp.models import load_model

    cfg = compose_cfg("model=tiny_qwen", f"method={method}")
    loaded = load_model(cfg.model)
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    positions = [[1, 2, 3], [4, 5]]
    loaded.model = methods.prepare(cfg.method, loaded.model, positions)
    n_trainable = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
    expected = {"loki": 5 * 80, "loki_lora": 3 * 16 + 16 * 80 + 2 * 16 + 16 * 80,
                "full": sum(v.numel() for k, v in base_state.items() if k != "lm_head.weight")}
    if method in expected:
        assert n_trainable == expected[method]
    else:
        assert 0 < n_trainable < expected["full"] // 4
    _fit(loaded.model, loaded.tokenizer, steps=2, lr=5e-2)
    ids = _batch(loaded.tokenizer)["input_ids"]
    with torch.no_grad():
        live = loaded.model(input_ids=ids).logits
    path = export_checkpoint(cfg, loaded, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert type(plain).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        reloaded = plain(input_ids=ids).logits
    assert_close_fp32(reloaded, live, f"{method}: merged export vs live")  # two float32 paths
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, base_state[k])]
    assert changed
    if method == "loki" or method == "loki_lora":
        assert set(changed) == {"model.layers.0.mlp.down_proj.weight",
                                "model.layers.1.mlp.down_proj.weight"}


def test_learning_rate_scales_with_quota_for_loki_only(compose_cfg):
    scale = ["quota_lr_scale={quotas: [10, 30], scales: [1.0, 0.4]}"]
    assert learning_rate(compose_cfg("quota=10", *scale)) == pytest.approx(1e-3)
    assert learning_rate(compose_cfg("quota=30", *scale)) == pytest.approx(0.4e-3)
    assert learning_rate(compose_cfg("quota=20", *scale)) == pytest.approx(0.7e-3)
    assert learning_rate(compose_cfg("quota=5", *scale)) == pytest.approx(1e-3)
    assert learning_rate(compose_cfg("quota=30", "method=lora", *scale)) == pytest.approx(1e-3)
    assert learning_rate(compose_cfg("quota=30")) == pytest.approx(1e-3)  # off by default


def test_unknown_method_and_missing_positions(compose_cfg, tiny_models):
    with pytest.raises(LokiError, match="method.name='adapter' is not known"):
        methods.prepare(compose_cfg("method.name=adapter").method, nn.Linear(2, 2), None)
    with pytest.raises(LokiError, match="needs positions"):
        methods.prepare(compose_cfg().method, tiny_models["tiny_llama"].model, None)


def test_lightning_fit_updates_only_rows(compose_cfg, tmp_path):
    from loki_exp.models import load_model

    cfg = compose_cfg("model=tiny_llama", "trainer.max_steps=2", "trainer.batch_size=2",
                      "trainer.precision=32-true")
    loaded = load_model(cfg.model)
    task = load_task(cfg.dataset)
    train, dropped = encode_all(loaded.tokenizer, task.train[:8], 768)
    model = apply_loki(loaded.model, [[1], [2], [3]])
    before = model.lm_head.weight.clone()
    rows_before = [p.weight_rows.detach().clone() for p in
                   (b.mlp.down_proj for b in model.model.layers)]
    tuner = CausalLMTuner(model, lr=1e-2, max_steps=2)
    trainer = build_trainer(cfg, tmp_path, loggers=[])
    trainer.fit(tuner, datamodule=SFTDataModule(train, 2, loaded.tokenizer.eos_token_id))
    assert trainer.global_step == 2
    assert torch.equal(model.lm_head.weight, before)
    for block, old in zip(model.model.layers, rows_before):
        assert not torch.equal(block.mlp.down_proj.weight_rows, old)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert sorted(ckpt["state_dict"]) == [f"lm.model.model.layers.{i}.mlp.down_proj.weight_rows"
                                          for i in range(3)]
    # Resuming restores the rows into a fresh LoKI model.
    fresh = apply_loki(load_model(cfg.model).model, [[1], [2], [3]])
    resumed = CausalLMTuner(fresh, lr=1e-2, max_steps=2)
    resumed.load_state_dict(ckpt["state_dict"], strict=False)
    for a, b in zip(fresh.model.layers, model.model.layers):
        assert torch.equal(a.mlp.down_proj.weight_rows, b.mlp.down_proj.weight_rows)


def test_checkpoint_every_zero_writes_no_checkpoint(compose_cfg, tmp_path):
    cfg = compose_cfg("model=tiny_llama", "trainer.checkpoint_every_n_steps=0")
    trainer = build_trainer(cfg, tmp_path, loggers=[])
    assert trainer.checkpoint_callbacks == []
    every_two = build_trainer(compose_cfg("trainer.checkpoint_every_n_steps=2"), tmp_path, loggers=[])
    assert [c._every_n_train_steps for c in every_two.checkpoint_callbacks] == [2]


def test_users_own_checkpoint_callback_works_with_every_zero(compose_cfg, tmp_path):
    cfg = compose_cfg("trainer.checkpoint_every_n_steps=0", "trainer.callbacks=[{_target_:"
                      "lightning.pytorch.callbacks.ModelCheckpoint,every_n_train_steps:3}]")
    trainer = build_trainer(cfg, tmp_path, loggers=[])
    assert [c._every_n_train_steps for c in trainer.checkpoint_callbacks] == [3]


def test_frozen_linear_keeps_no_autocast_copy_and_gives_the_same_gradients():
    from loki_exp.implant.loki_linear import FrozenLinear

    torch.manual_seed(0)
    plain = nn.Linear(16, 8).requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean.__class__ = FrozenLinear
    x1 = torch.randn(3, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = plain(x1), lean(x2)
    assert torch.equal(y1, y2)
    y1.float().pow(2).sum().backward()
    y2.float().pow(2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert lean.state_dict().keys() == plain.state_dict().keys()


def test_merge_restores_plain_linear_classes(tiny_models):
    model = copy.deepcopy(tiny_models["tiny_llama"].model)
    apply_loki(model, [[1], [2], [3]])
    merge_loki(model)
    assert {type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)} == {"Linear"}


def test_suppress_zeroes_exactly_the_selected_rows(compose_cfg, tiny_models):
    model = copy.deepcopy(tiny_models["tiny_llama"].model)
    before = [p.weight.clone() for p in down_projs(model)]
    methods.prepare(compose_cfg("method=suppress").method, model, [[0, 3], [], [63]])
    after = [p.weight for p in down_projs(model)]
    assert (after[0][[0, 3]] == 0).all() and torch.equal(after[0][1:3], before[0][1:3])
    assert torch.equal(after[1], before[1]) and (after[2][63] == 0).all()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0


@pytest.mark.parametrize("method", ["loki", "loki_lora", "full"])
def test_bf16_model_trains_fp32_masters_and_exports_bf16(compose_cfg, tmp_path, method):
    """A bf16 model at lr 1e-5: after two AdamW steps nearly every trainable entry has moved
    (held in bf16, 15-30% would), the model stays bf16, and the export is bf16 with every
    untrained weight bit-identical to the base."""
    import lightning as L
    from torch.utils.data import DataLoader

    from loki_exp.models import load_model

    cfg = compose_cfg("model=tiny_llama", "model.dtype=bfloat16", f"method={method}")
    loaded = load_model(cfg.model)
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    assert {v.dtype for v in base.values()} == {torch.bfloat16}
    positions = [list(range(0, 64, 4))] * 3
    model = methods.prepare(cfg.method, loaded.model, positions)
    tuner = CausalLMTuner(model, lr=1e-5, max_steps=2, warmup_ratio=0.0)
    start = {k: v.float().clone() for k, v in tuner.trained_tensors().items()}
    assert start and {v.dtype for v in tuner.trained_tensors().values()} <= {torch.float32,
                                                                             torch.bfloat16}
    batches = [_batch(loaded.tokenizer)] * 2
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        precision="bf16-mixed", default_root_dir=tmp_path)
    trainer.fit(tuner, train_dataloaders=DataLoader(batches, batch_size=None))
    trained = tuner.trained_tensors()
    assert {v.dtype for v in trained.values()} == {torch.float32}  # the masters
    moved = sum(int((trained[k] != start[k]).sum()) for k in start)
    total = sum(v.numel() for v in start.values())
    assert moved / total >= 0.99, f"{method}: {moved}/{total} entries moved"
    exported = methods.merge(cfg.method, model)
    state = exported.state_dict()
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    changed = {k for k in base if not torch.equal(state[k], base[k])}
    if method == "full":
        assert changed  # some bf16 entries crossed a rounding step
    else:
        assert changed <= {f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)}
        for i in range(3):
            key = f"model.layers.{i}.mlp.down_proj.weight"
            frozen = [r for r in range(64) if r not in positions[i]]
            assert torch.equal(state[key][frozen], base[key][frozen])


def test_fp32_masters_resume_from_a_checkpoint_exactly(compose_cfg, tmp_path):
    """Full fine-tuning of a bf16 model: a run resumed from its step-1 checkpoint ends with the
    same fp32 masters as the uninterrupted 2-step run (not re-made from the bf16 weights)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from loki_exp.models import load_model

    cfg = compose_cfg("model=tiny_llama", "model.dtype=bfloat16", "method=full")

    def run(steps, ckpt_dir=None, resume=None):
        loaded = load_model(cfg.model)
        tuner = CausalLMTuner(methods.prepare(cfg.method, loaded.model, None), lr=1e-5,
                              max_steps=2, warmup_ratio=0.0)
        callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)
                     ] if ckpt_dir else []
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                            enable_checkpointing=bool(ckpt_dir), callbacks=callbacks,
                            enable_progress_bar=False, enable_model_summary=False,
                            precision="bf16-mixed", default_root_dir=tmp_path)
        batches = [_batch(loaded.tokenizer)] * 2
        trainer.fit(tuner, train_dataloaders=DataLoader(batches, batch_size=None),
                    ckpt_path=resume, weights_only=True)
        return tuner.trained_tensors()

    whole = run(2)
    run(1, ckpt_dir=tmp_path / "ckpt")
    (first,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert "fp32_master_weights" in torch.load(first, weights_only=True)
    resumed = run(2, resume=str(first))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_resume_refuses_a_checkpoint_of_other_rows_or_method(compose_cfg, tmp_path):
    """A LoKI checkpoint resumed with other rows of the same shape used to load its trained
    values into the wrong rows silently; now the run's identity must match."""
    from loki_exp.implant.fit import run_implant
    from loki_exp.models import load_model

    common = ["model=tiny_llama", "trainer.batch_size=2", "trainer.precision=32-true",
              "trainer.checkpoint_every_n_steps=1", "trainer.warmup_ratio=0"]
    cfg = compose_cfg(*common, "trainer.max_steps=1")
    task = load_task(cfg.dataset)
    task.train = task.train[:8]
    rows = [[1], [2], [3]]
    run_implant(cfg, load_model(cfg.model), rows, task, tmp_path / "a", loggers=[])
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resume = compose_cfg(*common, "trainer.max_steps=2", f"trainer.resume_from={ckpt}")
    with pytest.raises(LokiError, match=r"was trained with other rows than this run"):
        run_implant(resume, load_model(cfg.model), [[4], [2], [3]], task, tmp_path / "b", [])
    lora = compose_cfg(*common, "method=lora", "trainer.max_steps=2",
                       f"trainer.resume_from={ckpt}")
    with pytest.raises(LokiError, match=r"other method, rows than"):
        run_implant(lora, load_model(cfg.model), None, task, tmp_path / "c", [])
    other_data = copy.copy(task)
    other_data.train = task.train[1:9]
    with pytest.raises(LokiError, match=r"other data than"):
        run_implant(resume, load_model(cfg.model), rows, other_data, tmp_path / "d", [])
    loaded = load_model(cfg.model)  # the same rows, method, weights and data: resumes
    run_implant(resume, loaded, rows, task, tmp_path / "e", [])
    assert torch.load(tmp_path / "e" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 2


def test_any_lightning_trainer_flag_from_the_shell_and_none_of_ours(compose_cfg, compose_raw,
                                                                   tmp_path):
    from loki_exp.config_check import check_config

    def check_trainer(cfg):
        check_config(cfg, groups=("trainer",))

    cfg = compose_cfg("+trainer.lightning.limit_val_batches=0",
                      "+trainer.lightning.num_sanity_val_steps=3", "trainer.precision=32-true")
    trainer = build_trainer(cfg, tmp_path, loggers=[])
    assert (trainer.limit_val_batches, trainer.num_sanity_val_steps) == (0, 3)
    assert trainer.precision == "32-true"
    with pytest.raises(LokiError, match=r"trainer.lightning.precision is set through "
                                        r"trainer.precision; set it there"):
        check_trainer(compose_raw("+trainer.lightning.precision=16-mixed"))
    with pytest.raises(LokiError, match=r"trainer.lightning has \['limit_val_batchez'\]: not "
                                        r"flags of lightning.pytorch.Trainer"):
        check_trainer(compose_raw("+trainer.lightning.limit_val_batchez=0"))


def test_progress_is_plain_lines_when_output_is_not_a_terminal(compose_cfg, tmp_path, capsys):
    """As in CI or a batch job's log (pytest's capture is not a terminal): one plain line per
    few percent with an ETA, for the KVA prompts and the training steps (with the loss)."""
    from loki_exp.implant.fit import run_implant
    from loki_exp.kva.stage import run_analyse
    from loki_exp.models import load_model

    cfg = compose_cfg("model=tiny_llama", "kva.limit=2", "kva.dtype=float32",
                      "trainer.max_steps=4", "trainer.batch_size=2", "trainer.precision=32-true",
                      "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0",
                      f"paths.cache_dir={tmp_path / 'cache'}")
    loaded = load_model(cfg.model)
    run_analyse(cfg, loaded)
    task = load_task(cfg.dataset)
    task.train = task.train[:8]
    run_implant(cfg, loaded, [[1], [2], [3]], task, tmp_path / "run", loggers=[])
    text = capsys.readouterr().err
    assert "analyse (KVA) batches: 2/2 (100%)" in text
    lines = [line for line in text.splitlines() if line.startswith("implant steps: ")]
    assert len(lines) == 4  # every step is >= 5% of 4 steps
    assert lines[-1].startswith("implant steps: 4/4 (100%)") and "ETA 0m00s, loss " in lines[-1]
    assert "\r" not in text
