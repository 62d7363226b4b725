#!/usr/bin/env bash
# The whole pipeline: prepare -> pretrain -> midtrain -> finetune -> export, with a sample after
# each stage. Extra config files apply to every stage; rerunning resumes where a run stopped.
#   ./run_pipeline.sh configs/tiny.py                                   # offline, CPU, minutes
#   LAUNCH="torchrun --standalone --nproc_per_node=8" ./run_pipeline.sh  # 8 GPUs
# The stages' directories are named here: $OUT_ROOT/<stage>[-<overlay>...], e.g. out/pretrain-tiny,
# each stage starting from the one before.
set -euo pipefail
cd "$(dirname "$0")"
launch=${LAUNCH:-python}
out_root=${OUT_ROOT:-out}
overlays=("$@")
suffix=""
for overlay in "${overlays[@]}"; do suffix="$suffix-$(basename "$overlay" .py)"; done
stage="setup"
trap 'echo "run_pipeline.sh: stopped in the $stage stage; fix it and rerun: finished stages are skipped quickly and a stopped one resumes" >&2' ERR
# Ctrl-C (or a SIGTERM): train.py checkpoints and exits 0, so the stage after it must not start.
# bash runs this once the stage in the foreground has ended.
trap 'echo "run_pipeline.sh: interrupted in the $stage stage (its progress is checkpointed); run the same command again to continue from there" >&2; exit 130' INT TERM

stage="prepare"
for config in configs/pretrain.py configs/midtrain.py configs/finetune.py; do
    # the files a stage reads (its datasets' meta.json, its task files), from the configuration train.py would run with
    settings=$(python train.py "$config" "${overlays[@]}" --print_config)
    needed=$(python -c "
import ast, sys
config = {key: ast.literal_eval(value) for key, value in (line.split(' = ', 1) for line in sys.argv[1].splitlines())}
print(' '.join([d + '/meta.json' for d in config['data_mixture'] or [config['data_dir']]] + list(config['eval_tasks'])))" "$settings")
    for file in $needed; do
        if [ ! -f "$file" ]; then
            case "$file" in
                data/demo/*|data/demo-chat/*|data/demo-tasks/*) python prepare.py ;;
                *) echo "run_pipeline.sh: $file is missing: prepare it first (README, Data)" >&2; exit 1 ;;
            esac
        fi
    done
done

previous=""
for stage in pretrain midtrain finetune; do
    out_dir="$out_root/$stage$suffix"
    # pretraining starts from scratch the first time and resumes after; a later stage starts from
    # the stage before (and resumes itself once it has checkpoints)
    start=${previous:-resume}
    echo "=== $stage -> $out_dir"
    $launch train.py "configs/$stage.py" "${overlays[@]}" --out_dir="$out_dir" --init_from="$start"
    if [ "$stage" = pretrain ]; then
        python sample.py --out_dir="$out_dir" --start="def " --num_samples=1 --max_new_tokens=100
    else
        python sample.py --out_dir="$out_dir" --prompt="What does json.dumps do?" --max_new_tokens=100
    fi
    previous=$out_dir
done

stage="export"
python export_hf.py --ckpt="$out_dir" --hf_dir="$out_dir/hf"
stage="report"
python report.py "$out_dir" || echo "run_pipeline.sh: no report (see above); the model is complete" >&2
echo "=== done: the chat model is in $out_dir, as a Hugging Face model in $out_dir/hf; the report of all three stages in $out_dir/report/report.md"
