"""The generation core: one implementation of decoding, sampling, stop strings,
grammar, penalties, logprobs, prefix reuse, ``n``/``best_of`` and beam search.

Every door runs on it: ``Model`` drives the scheduler in the caller's thread,
the server drives the same scheduler from its own thread.

- :mod:`.request`: a request, the events it reports, and its finished choices;
- :mod:`.logprobs`: token log-probabilities from logits;
- :mod:`.lanes`: KV slots and the lanes that feed the shared batch;
- :mod:`.sampled`: sampled choices (``n``, ``best_of``);
- :mod:`.beams`: beam search as sequences of the shared batch;
- :mod:`.scheduler`: continuous batching, one decode per step;
- :mod:`.engine`: a loaded model with its scheduler, prompts and embeddings.
"""
