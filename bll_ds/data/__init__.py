"""Data pipeline: raw documents -> tokenizer -> cached flat token streams -> deterministic batches.

    corpus = load_corpus(spec)                                   # corpus.py
    tok = build_tokenizer("bpe:8000", corpus.train, run_dir)     # tokenizer.py
    streams = prepare_token_streams(corpus, tok, cache_dir)      # packing.py
    sampler = MicroBatchSampler(streams.train, seq_len, mbs, seed, dp_rank, dp_size)  # sampler.py
    evals = EvalBatches(streams.val, seq_len, mbs, max_batches)
"""

from bll_ds.data.corpus import DEFAULT_CORPUS_MAX_BYTES, Corpus, default_corpus_files, load_corpus, split_documents
from bll_ds.data.packing import TokenStreams, open_stream, prepare_token_streams, token_dtype, token_windows_available
from bll_ds.data.sampler import EvalBatches, MicroBatchSampler
from bll_ds.data.tokenizer import Tokenizer, build_tokenizer, parse_tokenizer_spec

__all__ = [
    "DEFAULT_CORPUS_MAX_BYTES",
    "Corpus",
    "EvalBatches",
    "MicroBatchSampler",
    "TokenStreams",
    "Tokenizer",
    "build_tokenizer",
    "default_corpus_files",
    "load_corpus",
    "parse_tokenizer_spec",
    "open_stream",
    "prepare_token_streams",
    "split_documents",
    "token_dtype",
    "token_windows_available",
]
