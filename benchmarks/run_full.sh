#!/usr/bin/env bash
# Full-size figures, in commands bounded at 10 minutes each (about an hour on a loaded 2-core CPU machine).
# Training runs accumulate in results.json (--append_rounds): per precision, two side-by-side runs (ours and the
# baseline alternating steps in one process: the ratio to quote on a shared machine) and two runs of each pipeline
# alone (peak RSS, the split of a step), then ClipTrainer itself once per precision. The model section compares
# fp32/bf16 and the caption padding on the model step alone. The fast-path sections (torch.compile, activation
# checkpointing, channels-last, BLIP evaluation) run once each at the end; a cold compile of the full model takes
# 10 minutes or more here, so that command gets longer.
set -euo pipefail
cd "$(dirname "$0")/.."
clip="timeout 600 python benchmarks/bench_clip.py"
$clip --sections matmul,pipeline,optimizer
$clip --sections retrieval
$clip --sections model                                                   # about 9 minutes here
$clip --sections train --precisions fp32 --pipelines ours,baseline            # replaces earlier training figures
$clip --sections train --precisions bf16 --pipelines ours,baseline --append_rounds
for _ in 1 2; do
    $clip --sections train --precisions fp32 --pipelines side_by_side --append_rounds
    $clip --sections train --precisions bf16 --pipelines side_by_side --append_rounds
done
$clip --sections train --precisions fp32 --pipelines ours,baseline --append_rounds
$clip --sections train --precisions bf16 --pipelines ours,baseline --append_rounds
$clip --sections train --precisions fp32,bf16 --pipelines trainer --append_rounds
timeout 600 python benchmarks/bench_caption_vqa.py --tasks caption
timeout 600 python benchmarks/bench_caption_vqa.py --tasks vqa
timeout 3600 python benchmarks/bench_clip.py --sections compile --precisions bf16
$clip --sections checkpointing --precisions fp32
$clip --sections channels_last --precisions bf16
$clip --sections attention --precisions bf16,fp32 --rounds 3
$clip --sections compiled_train --precisions fp32,bf16
timeout 1200 python benchmarks/bench_caption_vqa.py --tasks caption_eval --precisions fp32,bf16
timeout 1200 python benchmarks/bench_caption_vqa.py --tasks checkpointing --precisions fp32
