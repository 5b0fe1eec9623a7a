"""Run the training script (under `accelerate launch` or torchrun), then record this process's final weights and
log history, so that a test can compare processes with each other and with a single-process run."""

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

from evl_hf.run_video_classification import leave_process_group, main


trainer = main(sys.argv[1:])
digest = hashlib.sha256()
for name, parameter in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
rank = trainer.accelerator.process_index
world = trainer.accelerator.num_processes
output = Path(trainer.args.output_dir)
(output / f"weights_rank{rank}_of_{world}.sha256").write_text(digest.hexdigest())
(output / f"log_history_rank{rank}_of_{world}.json").write_text(json.dumps(trainer.state.log_history))
assert trainer.state.global_step > 0

# Free the trainer and with it the process group before the interpreter exits: gloo's threads torn down at exit can
# abort a rank after a run that succeeded ("terminate called without an active exception"). The abort is rare; that
# the threads are gone when the interpreter starts its teardown is checked on every run.
del trainer
leave_process_group()


def fail_if_gloo_threads_remain():
    threads = []
    for task in Path("/proc/self/task").iterdir():
        try:
            threads.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    if any("gloo" in name for name in threads):
        sys.stdout.flush()
        print(f"rank {rank}: gloo's threads are still running at exit: {threads}", file=sys.stderr, flush=True)
        os._exit(3)


if Path("/proc/self/task").is_dir():
    atexit.register(fail_if_gloo_threads_remain)
