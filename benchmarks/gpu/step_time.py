"""GPU step time of the joint driver against plain fine-tuning (MiniLM, batch 32 x 64 tokens, ratio 0.5).

Run on the lent machine after `source benchmarks/gpu/setup.sh`; results in
benchmarks/results/minilm_sentiment_gpu/step_time.md."""

import copy
import dataclasses
import json
import time

import torch

from tunecomp_fx import TrainingConfig, prepare, JointTrainer
from tunecomp_fx.finetune import finetune
from tunecomp_fx.sentiment import sentiment_task
task = sentiment_task(max_length=64, batch_size=32)
model = task.model.cuda()
example = {k: v.cuda() for k, v in task.example.items()}
calib = [{k: v.cuda() for k, v in b.items()} for b in task.calibration]
steps = 100
def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize(); return (time.perf_counter() - t) / steps
cfg = TrainingConfig(steps=steps, lr=1e-4)
def joint(blend_steps):
    prepared = prepare(model, example, 0.5, calib=calib, rank_slack=0.25, progress=False)
    trainer = JointTrainer(prepared, dataclasses.replace(cfg, blend_steps=blend_steps), data=task.train, device="cuda", progress=False)
    return timed(trainer.fit)
rows = {}
for rnd in range(2):  # the first round warms up
    rows = {"plain": timed(lambda: finetune(copy.deepcopy(model), task.train, cfg, progress=False)),
            "blend": joint(1.0), "after_teacher_removal": joint(1)}
print(json.dumps({k: f"{1000 * v:.1f} ms/step ({v / rows['plain']:.2f}x plain)" for k, v in rows.items()}, indent=1))
