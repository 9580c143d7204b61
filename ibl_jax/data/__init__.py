"""IBL session data: schema and CSR decoding, session loading, the synthetic corpus, training batches."""

from ibl_jax.data.batches import BatchIterator, assemble, sequential_batches, trial_index
from ibl_jax.data.schema import SessionError
from ibl_jax.data.sessions import Corpus, Session, Split, load_corpus, load_session, resolve_sources, save_vocab
