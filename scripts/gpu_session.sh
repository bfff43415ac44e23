#!/usr/bin/env bash
# The GPU measurements of issue 15, in steps sized for one 15-minute lease of one CUDA machine
# (docs/gpu-runbook.md has the calls, the sizes and the expected times). Each step stops itself
# after its budget and has written what it measured by then; `example` resumes where it stopped.
#
#   scripts/gpu_session.sh bench     # Carlini et al. pipeline (bf16 and fp32, standard and dual,
#                                    # each against the bare forward; Cohen et al.'s loop as the
#                                    # peer row), then the certify overhead on ResNet-20 and -110
#   scripts/gpu_session.sh example   # examples/fashion_mnist, Gaussian experts, full size, the
#                                    # default design (class gate + the experts' cascade)
#   scripts/gpu_session.sh routing   # cascade-keep, cascade-plain and the shared gate on its counts,
#                                    # and the Multiscale-keeping cascades' ceiling
#   scripts/gpu_session.sh compiled  # the Carlini pipeline again with torch.compile (bf16)
#
# Needs: .data/fashion-mnist (the four IDX files) for example/routing, and .whl/ (diffusers and
# importlib_metadata wheels) where diffusers is not installed. Results go to $OUT (default
# runs/gpu-session), each step's few files at most two folders down (what the device tool brings
# back); the example's workspace lives in runs/fm-gpu and goes to $OUT/fm-gpu.tar.gz after each
# step that changes it (its report also to $OUT/report/), so a fresh machine can resume from it.
# PYTHON picks the interpreter (default python3). SMOKE=1 runs every step at its tiny CPU size
# (a check of this script, not a measurement). WORKSPACE moves the example's workspace; LIMIT
# certifies fewer test images; STEP_SECONDS overrides a step's budget.
set -euo pipefail
step=${1:?usage: scripts/gpu_session.sh bench|example|routing|compiled}
out=${OUT:-runs/gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! "$py" -c "import diffusers" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

if [[ ${SMOKE:-0} == 1 ]]; then
  carlini=(--tiny --device cpu) overhead=(--device cpu --n 200 --inputs 2 --arch cifar_resnet20)
  example_size=(--smoke --quiet) device=cpu ws=${WORKSPACE:-runs/fm-gpu-smoke}
else
  carlini=(--device cuda) overhead=(--device cuda) device=cuda ws=${WORKSPACE:-runs/fm-gpu}
  example_size=(--data-root .data/fashion-mnist)
fi
[[ -n ${LIMIT:-} ]] && example_size+=(--limit "$LIMIT")

save_workspace() { # the workspace as one archive, and its report as plain files
  if [[ -d $ws ]]; then
    tar -czf "$out/$(basename "$ws").tar.gz" -C "$(dirname "$ws")" "$(basename "$ws")"
    local report=$ws/gaussian/.rsrouter/report
    if [[ -d $report ]]; then
      mkdir -p "$out/report" && cp "$report"/{certified_accuracy.md,summary.json,curve.png} "$out/report/"
    fi
  fi
}

log() { echo "== $(date -u +%FT%TZ) $*"; }

finish() { # the step's exit status; 124: stopped at its budget (what it measured is written)
  [[ $1 == 124 ]] && log "stopped at the step budget ($2 s): call this step again to finish"
  exit "$1"
}

case $step in
bench) # budget 210 s: the pipeline ~120 s, the overhead ~30 s (estimates; see the runbook)
  budget=${STEP_SECONDS:-210}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch, timm, diffusers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'timm', timm.__version__, 'diffusers', diffusers.__version__)"
  status=0
  log "Carlini pipeline, eager: bf16 and fp32, standard and dual, a profile, the peer loop"
  timeout $((budget - 60)) "$py" benchmarks/carlini_pipeline.py "${carlini[@]}" --profile \
    --out "$out/carlini-eager" | tee "$out/carlini-eager.txt" || status=$?
  log "certify overhead on small nets"
  timeout 55 "$py" benchmarks/certify_overhead.py "${overhead[@]}" \
    --out "$out/certify-overhead.json" | tee "$out/certify-overhead.txt" || status=$?
  finish "$status" "$budget"
  ;;
compiled) # budget 240 s: compilation (UNet, ViT, ResNet-110; 2 batch shapes each), bf16 runs
  budget=${STEP_SECONDS:-240}
  log "Carlini pipeline, torch.compile, bf16"
  status=0
  timeout "$budget" "$py" benchmarks/carlini_pipeline.py "${carlini[@]}" --compile \
    --precision bf16 --no-peer --out "$out/carlini-compiled" \
    | tee "$out/carlini-compiled.txt" || status=$?
  finish "$status" "$budget"
  ;;
example) # budget 420 s: experts ~120 s, val counts ~100 s, class-gate fit ~30 s (CPU: 13 s on
  budget=${STEP_SECONDS:-420} # 500 val images, 2-core VM), test counts ~100 s; headroom; resumable
  log "examples/fashion_mnist, Gaussian experts (resumes from $ws)"
  status=0
  timeout "$budget" "$py" examples/fashion_mnist/run.py "${example_size[@]}" --mode gaussian \
    --device "$device" --out "$ws" | tee "$out/example.txt" || status=$?
  save_workspace
  finish "$status" "$budget"
  ;;
routing) # budget 90 s: beside the example's own rows, cascade-keep and cascade-plain (cached
  budget=${STEP_SECONDS:-90} # counts) and the shared gate (its router sampled on val and test)
  log "routing designs on $ws/gaussian: fitted on val, the test split certified once"
  status=0
  timeout "$budget" "$py" benchmarks/routing_study.py "$ws/gaussian" --device "$device" \
    --only cascade-keep --only cascade-plain --only gate --quiet \
    --out "$out/routing.json" | tee "$out/routing.txt" || status=$?
  # how far any cascade that keeps Multiscale could go on these experts (cached counts, seconds)
  timeout "$budget" "$py" benchmarks/cascade_ceiling.py "$ws/gaussian" --device "$device" \
    --plug-in --quiet --out "$out/ceiling.json" | tee "$out/ceiling.txt" || status=$?
  save_workspace
  finish "$status" "$budget"
  ;;
*)
  echo "error: unknown step '$step' (bench, compiled, example or routing)" >&2
  exit 2
  ;;
esac
