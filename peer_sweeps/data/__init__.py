"""The data layer: named text sources, data suites, the tokenizer, prepared token arrays, evaluation.

    prepare_suite("default", "data")          # fetch, clean, split, tokenize; idempotent
    data = load_suite("default", "data")       # memmaps: data.train, data.eval_sets (primary first)
    batches = TrainBatches(data.train, seq_len, batch_size, seed, rank, world_size)
    scored = evaluation_sample(data.eval_sets["wikipedia"], data.eot_id, 131072, seq_len)  # whole documents
    evaluate_lm(model, scored, seq_len, batch_size, len(scored), data.token_bytes)
"""

from peer_sweeps.data.corpora import CORPORA
from peer_sweeps.data.ensure import ensure_prepared, ensure_study_data
from peer_sweeps.data.errors import DataError
from peer_sweeps.data.evaluate import MIN_SAMPLE_TOKENS, TrainBatches, evaluate_lm, evaluation_sample
from peer_sweeps.data.load import PreparedSuite, load_suite
from peer_sweeps.data.manifest import Manifest, manifest_table
from peer_sweeps.data.prepare import default_root, prepare_suite
from peer_sweeps.data.sources import HFDataset, LocalFiles, RegistryCorpus
from peer_sweeps.data.suites import SUITES, Suite

__all__ = ["CORPORA", "DataError", "HFDataset", "LocalFiles", "MIN_SAMPLE_TOKENS", "Manifest", "PreparedSuite",
           "RegistryCorpus", "SUITES", "Suite", "TrainBatches", "default_root", "ensure_prepared", "ensure_study_data",
           "evaluate_lm", "evaluation_sample", "load_suite", "manifest_table", "prepare_suite"]
