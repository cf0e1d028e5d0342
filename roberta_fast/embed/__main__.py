"""python -m roberta_fast.embed ...: `roberta-fast embed`, e.g. under torchrun:
torchrun --nproc-per-node N -m roberta_fast.embed MODEL_DIR --input FILE --output FILE"""

import sys

from .job import main

sys.exit(main())
