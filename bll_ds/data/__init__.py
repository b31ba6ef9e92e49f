"""Data pipeline: raw documents -> tokenizer -> cached flat token streams -> deterministic batches.

    corpus = load_corpus(spec)                                   # corpus.py
    tok = build_tokenizer("bpe:8000", corpus.train, run_dir)     # tokenizer.py
    streams = prepare_token_streams(corpus, tok, cache_dir)      # packing.py
    sampler = MicroBatchSampler(streams.train, seq_len, mbs, seed, dp_rank, dp_size)  # sampler.py
    evals = EvalBatches(streams.val, seq_len, mbs, max_batches)

At scale, the corpus is tokenized once, outside training, into shards (prepare_tokens.py, streamed
through documents.py) and a run reads them as one array (shards.py):

    python -m bll_ds.data.prepare_tokens --data SPEC --tokenizer bpe:32000 --out DIR
    tokens = open_token_dir("tokens:DIR")                        # shards.py
    sampler = MicroBatchSampler(tokens.train, seq_len, mbs, seed, dp_rank, dp_size)

Tokenizers are sentencepiece (tokenizer.py) or Hugging Face (hf_tokenizer.py), behind one interface.
"""

from bll_ds.data.corpus import DEFAULT_CORPUS_MAX_BYTES, Corpus, default_corpus_files, load_corpus, split_documents
from bll_ds.data.documents import iter_dataset_texts, iter_documents
from bll_ds.data.packing import TokenStreams, open_stream, prepare_token_streams, token_dtype, token_windows_available
from bll_ds.data.sampler import EvalBatches, MicroBatchSampler
from bll_ds.data.shards import ShardedTokens, TokenDir, is_token_dir_spec, open_token_dir
from bll_ds.data.tokenizer import Tokenizer, build_tokenizer, load_run_tokenizer, open_tokenizer, parse_tokenizer_spec

__all__ = [
    "DEFAULT_CORPUS_MAX_BYTES",
    "Corpus",
    "EvalBatches",
    "MicroBatchSampler",
    "ShardedTokens",
    "TokenDir",
    "TokenStreams",
    "Tokenizer",
    "build_tokenizer",
    "default_corpus_files",
    "is_token_dir_spec",
    "iter_dataset_texts",
    "iter_documents",
    "load_corpus",
    "load_run_tokenizer",
    "open_token_dir",
    "open_tokenizer",
    "parse_tokenizer_spec",
    "open_stream",
    "prepare_token_streams",
    "split_documents",
    "token_dtype",
    "token_windows_available",
]
