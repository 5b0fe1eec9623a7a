"""Run the training script (under `accelerate launch` or torchrun), then record this process's final weights and
log history, so that a test can compare processes with each other and with a single-process run."""

import hashlib
import json
import sys
from pathlib import Path

from evl_hf.run_video_classification import main


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

# Leave the process group before the interpreter exits: torch's threads torn down at exit can abort a rank
# ("terminate called without an active exception"), as PyTorch's docs warn.
import torch.distributed

if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
