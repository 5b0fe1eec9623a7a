from transformers.utils import logging

from evl_hf.explain import main


# The command's output is its summary: no weight-loading progress bars before it (in this process only; `main` called
# from Python leaves the caller's settings alone).
logging.disable_progress_bar()
main()
