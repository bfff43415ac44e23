#!/usr/bin/env bash
# The GPU measurements of issues 7 and 8, in steps that each fit one 10-minute call of the device
# tool. docs/gpu-runbook.md has the exact calls (what to carry, how to resume on a fresh machine).
#
#   scripts/gpu_session.sh bench     # Carlini et al. pipeline, standard + dual (eager);
#                                    # certify overhead on ResNet-110
#   scripts/gpu_session.sh compiled  # the Carlini pipeline again with torch.compile
#   scripts/gpu_session.sh example   # examples/fashion_mnist (Gaussian experts, full size);
#                                    # resumable: call it again until it prints the report
#   scripts/gpu_session.sh study     # router variants on the example's workspace
#   scripts/gpu_session.sh routing   # routing designs tuned on val (benchmarks/routing_study.py)
#
# Needs: .data/fashion-mnist (the four IDX files) for example/study, and .whl/ (diffusers and
# importlib_metadata wheels) where diffusers is not installed. Results go to $OUT (default
# runs/gpu-session); the example's workspace lives in runs/fm-gpu and is copied to
# $OUT/fm-gpu after every step so that a fresh machine can carry it back in.
# PYTHON picks the interpreter (default python3). SMOKE=1 runs every step at its tiny CPU size
# (a check of this script, not a measurement). WORKSPACE moves the example's workspace.
set -euo pipefail
step=${1:?usage: scripts/gpu_session.sh bench|compiled|example|study|routing}
out=${OUT:-runs/gpu-session}
budget=${STEP_SECONDS:-540} # each step stops itself before the device call's 600 s limit
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
  bench_size=(--tiny) example_size=(--smoke) device=cpu ws=${WORKSPACE:-runs/fm-gpu-smoke}
else
  bench_size=() example_size=(--data-root .data/fashion-mnist) device=cuda
  ws=${WORKSPACE:-runs/fm-gpu}
fi

save_workspace() { # copy the workspace out (router training keeps only its latest checkpoint)
  if [[ -d $ws ]]; then
    rm -rf "${out:?}/$(basename "$ws")" && cp -r "$ws" "$out/"
  fi
}

log() { echo "== $(date -u +%FT%TZ) $*"; }

case $step in
bench)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch, timm, diffusers; print('torch', torch.__version__, 'timm', \
timm.__version__, 'diffusers', diffusers.__version__)"
  log "Carlini pipeline, eager"
  timeout $((budget - 120)) "$py" benchmarks/carlini_pipeline.py --device "$device" \
    "${bench_size[@]}" --out "$out/carlini-eager" | tee "$out/carlini-eager.txt"
  log "certify overhead (ResNet-110)"
  timeout 120 "$py" benchmarks/certify_overhead.py --device "$device" \
    | tee "$out/certify-overhead.txt"
  ;;
compiled)
  log "Carlini pipeline, torch.compile"
  timeout "$budget" "$py" benchmarks/carlini_pipeline.py --device "$device" "${bench_size[@]}" \
    --compile --out "$out/carlini-compiled" | tee "$out/carlini-compiled.txt"
  ;;
example)
  mode=(--mode gaussian)
  [[ ${SMOKE:-0} == 1 ]] && mode=(--mode gaussian --quiet)
  log "examples/fashion_mnist ${mode[*]} (resumes from $ws)"
  status=0
  timeout "$budget" "$py" examples/fashion_mnist/run.py "${example_size[@]}" "${mode[@]}" \
    --out "$ws" | tee "$out/example.txt" || status=$?
  save_workspace
  [[ $status == 124 ]] && log "stopped at the step budget: call this step again to resume"
  exit "$status"
  ;;
study)
  log "router study on $ws/gaussian"
  status=0
  variants=(base T0.1 lr1e-3-ep60 lr1e-3-ep60-T0.1 lr1e-3-ep60-T0.1-lam100
    lr1e-3-ep60-T0.1-se0.75 classmap-shirt0.25-pullcoat0.5 classmap-tops0.5)
  # a variant already trained and certified is read back, not redone
  timeout "$budget" "$py" benchmarks/router_study.py "$ws/gaussian" --device "$device" \
    "${variants[@]/#/--only=}" --json "$out/study.json" | tee "$out/study.txt" || status=$?
  save_workspace
  exit "$status"
  ;;
routing)
  log "routing designs (learned, learned-bias, gate, class-gate) on $ws/gaussian: tuned on val, test once"
  status=0
  timeout "$budget" "$py" benchmarks/routing_study.py "$ws/gaussian" --device "$device" \
    --out "$out/routing.json" | tee "$out/routing.txt" || status=$?
  save_workspace
  exit "$status"
  ;;
*)
  echo "error: unknown step '$step' (bench, compiled, example, study or routing)" >&2
  exit 2
  ;;
esac
