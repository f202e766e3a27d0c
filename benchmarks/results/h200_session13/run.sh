#!/bin/bash
# The session-13 H200 run: benchmarks alone on the GPU while two shapes training arms prepare their data
# on the CPU; then the arms train side by side until TRAIN_DEADLINE; then both flows are exported (fp16).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
L=/tmp/L; SYNC=/tmp/sync; R=/tmp/runs; mkdir -p $L $SYNC $R
nvidia-smi > $L/nvidia-smi.txt 2>&1
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())" > $L/versions.txt 2>&1
cat $L/versions.txt
export ARMS=A,B SYNC_DIR=$SYNC TRAIN_DEADLINE=$((T0 + ${TRAIN_END:-460}))
CATS='[single_object, two_object, counting, colors, position, color_attr, two_object, position, color_attr, position, color_attr, color_attr]'
for arm in A B; do
  extra=""; [ $arm = A ] && extra="--set model.text_positions=true"
  ARM=$arm TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 python3 .gpu/arm.py train --config configs/shapes_t2i_long.yaml \
    --out-dir $R/$arm --steps 100000 --threads 2 --set train.init_from=starflow/assets/starflow_shapes/model \
    --set train.text_encoder=table:.gpu/shapes_text_table.safetensors --set train.dataset_size=${SCENES:-200000} \
    --set "train.scene_categories=$CATS" --set train.batch_size=${BATCH:-256} --set train.lr=5e-4 --set train.warmup_steps=100 \
    --set train.seed=6 --set train.precision=fp32 --set train.device=${DEV:-cuda} --set train.log_every=100 $extra \
    > $L/arm_$arm.log 2>&1 &
  echo $! > $SYNC/pid_$arm
done
echo "arms launched at +$(( $(date +%s) - T0 )) s"
[ -z "${SKIP_BENCH:-}" ] && timeout ${CHECK_S:-70} python3 benchmarks/gpu_check.py > $L/gpu_check.txt 2>&1; echo "gpu_check rc $? at +$(( $(date +%s) - T0 )) s"
[ -z "${SKIP_BENCH:-}" ] && timeout ${OFFICIAL_S:-100} python3 benchmarks/official_speed.py --official-path .gpu/ml-tarflow --device cuda --repeats 1 \
  --batch-sizes ${OFFICIAL_BATCHES:-1,32,64} --json $L/official_speed_h200.json > $L/official_speed_h200.txt 2>&1
echo "official_speed rc $? at +$(( $(date +%s) - T0 )) s"
[ -z "${SKIP_BENCH:-}" ] && timeout ${RF_S:-70} python3 benchmarks/compare_models.py --speed-only --device cuda --widths ${WIDTHS:-128,384,768} \
  --batches ${RF_BATCHES:-32,64,128} --text-encoder table:.gpu/shapes_text_table.safetensors \
  --json $L/rf_speed_h200.json > $L/rf_speed_h200.txt 2>&1
echo "rf speed rc $? at +$(( $(date +%s) - T0 )) s"
while [ ! -e $SYNC/ready_A ] || [ ! -e $SYNC/ready_B ]; do sleep 1; kill -0 $(cat $SYNC/pid_A) 2>/dev/null || break; done; echo "arms ready at +$(( $(date +%s) - T0 )) s"; ls $SYNC; tail -n 3 $L/arm_A.log $L/arm_B.log
touch $SYNC/go; echo "go at +$(( $(date +%s) - T0 )) s"
# watchdog: SIGTERM (checkpoint, then stop) 25 s after the deadline, SIGKILL 20 s later
for arm in A B; do
  pid=$(cat $SYNC/pid_$arm)
  while kill -0 $pid 2>/dev/null && [ $(date +%s) -lt $((TRAIN_DEADLINE + 25)) ]; do sleep 1; done
  kill -0 $pid 2>/dev/null && { echo "arm $arm past deadline: SIGTERM"; kill -TERM $pid; sleep 20; kill -KILL $pid 2>/dev/null; }
  wait $pid; echo "arm $arm rc $? at +$(( $(date +%s) - T0 )) s"
done
for arm in A B; do
  pos=0; [ $arm = A ] && pos=1
  python3 .gpu/export.py $R/$arm $OUT/$arm $pos >> $L/export.txt 2>&1
done
cat $L/export.txt
for arm in A B; do cp $R/$arm/log.jsonl $L/log_$arm.jsonl; cp -r $R/$arm/samples $L/samples_$arm 2>/dev/null; cp $R/$arm/config.yaml $L/config_$arm.yaml 2>/dev/null; done
ls $R/A
tar czf $OUT/logs.tar.gz -C /tmp L
echo "done at +$(( $(date +%s) - T0 )) s"
