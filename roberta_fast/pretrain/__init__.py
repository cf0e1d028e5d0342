"""roberta_fast.pretrain: masked-language-model pretraining of a RoBERTa from scratch, as RoBERTa was trained
(docs/pretraining.md).

    from roberta_fast.pretrain import pretrain
    res = pretrain(output="out")                      # the built-in corpus and the tiny model, a few CPU minutes
    res = pretrain(corpus="texts/", output="out", model="base", precision="bf16", max_steps=100_000)

The CLI is `roberta-fast pretrain [--corpus DIR] --output DIR [--max-steps N] [--resume]` (cli.py here);
data-parallel runs are the same command under `torchrun --nproc-per-node N`. The output folder (config.json,
model.safetensors, tokenizer.json) loads in RobertaForMaskedLM.from_pretrained and transformers'
AutoModelForMaskedLM.from_pretrained.

corpus.py     the corpus folder read lazily, the built-in corpus (standard-library docstrings), PackedStream
tokenizer.py  byte-level BPE trained with `tokenizers` (RoBERTa's special tokens), or a tokenizer.json reused
trainer.py    PretrainArgs, Pretrainer, pretrain(): the loop on the fine-tuning trainer's optimizer, schedule,
              checkpoints and process group
"""

from .corpus import BUILTIN_MODULES, Corpus, CorpusError, PackedStream, builtin_documents, write_builtin_corpus  # noqa: F401
from .evaluate import unigram_entropy  # noqa: F401
from .tokenizer import TokenizerError, train_bpe  # noqa: F401
from .trainer import PRESETS, PretrainArgs, Pretrainer, PretrainResult, pretrain  # noqa: F401
