# `python -m evl_hf.timeline`. A package's __main__ rather than the module run as a script: `import evl_hf` imports the
# timeline (to register its pipeline), and runpy warns when it runs a module that is already imported.
from transformers.utils import logging

from evl_hf.allocator import keep_freed_memory
from evl_hf.timeline import main


# Only the timeline's own progress bar: none of transformers' weight-loading bars before it (in this process only).
logging.disable_progress_bar()
keep_freed_memory()  # this process is ours: keep freed memory for the next batch (see the function)
main()
