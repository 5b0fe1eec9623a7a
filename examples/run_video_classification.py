#!/usr/bin/env python
# Copyright 2026 The evl-hf authors. Licensed under the Apache License, Version 2.0.
"""
Train, evaluate and predict with EVL on video folders, list files or a `datasets` data set, with `Trainer`.

    python examples/run_video_classification.py --backbone openai/clip-vit-base-patch16 \
        --train_dir data/train --validation_dir data/val --output_dir evl-out \
        --do_train --do_eval --num_frames 8 --sampling_rate 16 --learning_rate 4e-4 --weight_decay 0.05 \
        --decay_norms_and_biases true --lr_scheduler_type cosine --max_grad_norm 0 \
        --per_device_train_batch_size 32 --max_steps 50000 --bf16

    # 8 GPUs:                   accelerate launch --num_processes 8 examples/run_video_classification.py ...
    # 2 processes on the CPU:   accelerate launch --multi_gpu --num_processes 2 examples/run_video_classification.py ... --use_cpu true

The driver lives in `evl_hf.run_video_classification` (the demo runs the same code); `--help` lists the arguments.
`--demo` runs the offline demo instead (synthetic motion data set, a tiny CLIP tower pretrained on its frames).
"""

from evl_hf.run_video_classification import (  # noqa: F401  (re-exported for scripts that import this file)
    DataTrainingArguments,
    ModelArguments,
    build_model,
    main,
    run,
)


if __name__ == "__main__":
    run()
