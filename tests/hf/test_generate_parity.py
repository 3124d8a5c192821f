"""Incremental decoding against transformers' own: greedy `generate` with its KV cache gives the
same tokens, and the logits of every decoding step match ours from our cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_parity import BASE, CASES, torch_reference

from distill import hf
from distill.model.generate import generate

PROMPT, LENGTH = 5, 40  # past several attention chunks (4, 8, 16) and floor_scale


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case):
    reference = torch_reference(case)
    prompt = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(2, PROMPT))
    with torch.no_grad():
        theirs = reference.generate(torch.from_numpy(prompt).long(), max_new_tokens=LENGTH - PROMPT, do_sample=False,
                                    eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                                    output_logits=True)  # no end-of-sequence token: every step is sampled
    their_tokens = theirs.sequences.numpy()
    their_logits = torch.stack(theirs.logits, dim=1).float().numpy()  # [B, LENGTH - PROMPT, V]

    ours = hf.from_hf(reference)
    assert LENGTH > 2 * ours.cfg.attention_chunk_size
    tokens = generate(ours, jnp.asarray(prompt), LENGTH, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens), their_tokens)

    out = ours(jnp.asarray(their_tokens[:, :PROMPT]), cache=ours.init_cache(2, LENGTH))
    logits, cache = [out.logits[:, -1]], out.cache
    for t in range(PROMPT, LENGTH - 1):
        out = ours(jnp.asarray(their_tokens[:, t:t + 1]), cache=cache)
        logits.append(out.logits[:, -1])
        cache = out.cache
    np.testing.assert_allclose(np.stack(logits, axis=1), their_logits, atol=1e-4, rtol=0)
