#!/usr/bin/env bash
# The whole pipeline: prepare -> pretrain -> midtrain -> finetune -> export, with a sample after
# each stage. Extra config files apply to every stage; rerunning resumes where a run stopped.
#   ./run_pipeline.sh configs/tiny.py                                   # offline, CPU, minutes
#   LAUNCH="torchrun --standalone --nproc_per_node=8" ./run_pipeline.sh  # 8 GPUs
set -euo pipefail
cd "$(dirname "$0")"
launch=${LAUNCH:-python}
overlays=("$@")
stage="setup"
trap 'echo "run_pipeline.sh: stopped in the $stage stage; fix it and rerun: finished stages are skipped quickly and a stopped one resumes" >&2' ERR

# a config variable of a stage as train.py will see it (train.py's defaults, the configs, the overlays)
setting() {
    local name=$1; shift
    python - "$@" <<PY
exec(open("train.py").read().split("exec(open(")[0])
exec(open("configurator.py").read())
print(repr($name) if not isinstance($name, str) else $name)
PY
}

stage="prepare"
for config in configs/pretrain.py configs/midtrain.py configs/finetune.py; do
    for dir in $(setting "' '.join(data_mixture or [data_dir])" "$config" "${overlays[@]}"); do
        if [ ! -f "$dir/meta.json" ]; then
            case "$dir" in
                data/demo|data/demo-chat) python prepare.py ;;
                *) echo "run_pipeline.sh: $dir is missing: prepare it first (README, Data)" >&2; exit 1 ;;
            esac
        fi
    done
done

for stage in pretrain midtrain finetune; do
    config="configs/$stage.py"
    out_dir=$(setting out_dir "$config" "${overlays[@]}")
    extra=()
    [ "$stage" = pretrain ] && extra=(--init_from=resume)  # from scratch the first time, resumed after
    echo "=== $stage -> $out_dir"
    $launch train.py "$config" "${overlays[@]}" "${extra[@]}"
    if [ "$stage" = pretrain ]; then
        python sample.py --out_dir="$out_dir" --start="def " --num_samples=1 --max_new_tokens=100
    else
        python sample.py --out_dir="$out_dir" --prompt="What does json.dumps do?" --max_new_tokens=100
    fi
done

stage="export"
python export_hf.py --ckpt="$out_dir" --hf_dir="$out_dir/hf"
echo "=== done: the chat model is in $out_dir, and as a Hugging Face model in $out_dir/hf"
