"""python -m roberta_fast.embed ...: `roberta-fast embed` (torchrun: `torchrun --nproc-per-node N -m roberta_fast.embed`)."""

import sys

from .job import main

sys.exit(main())
