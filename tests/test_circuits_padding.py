"""Padded batches: every circuit method gives each prompt what it gets alone (a Llama-style GQA
rotary model, left padding, so position ids must count real tokens)."""

import numpy as np

from jaxpatch import circuits, edges
from tests.test_circuits_path import LLAMA, _model
from tests.test_padding_gqa import _pad, _prompts


def test_padded_circuits_and_paths_equal_each_prompt_alone():
    m = _model(LLAMA)
    clean_rows, corrupt_rows = _prompts(lens=(7, 4))
    c, mask = _pad(clean_rows, "left")
    k, _ = _pad(corrupt_rows, "left")
    ans, wrong = np.array([3, 9]), np.array([11, 5])
    g = edges.EdgeGraph.of(m.config)
    rng = np.random.default_rng(1)
    masks = np.stack([g.valid, g.valid & (rng.random(g.valid.shape) < 0.7), np.zeros_like(g.valid)])
    pp = dict(senders=["L0H1", "MLP0", "embed"], receivers=["L1H0.q", "L2KV1.k", "MLP1.in", "logits"])
    circ = circuits.evaluate_circuit(m, c, k, masks, answer=ans, wrong=wrong, attention_mask=mask)
    path = circuits.path_patch(m, c, k, answer=ans, wrong=wrong, attention_mask=mask, **pp)
    edge = edges.exact_edge_patch(m, c, k, [("L0H1", "L2KV1.k"), ("MLP0", "logits")], answer=ans, wrong=wrong,
                                  attention_mask=mask)
    for b in range(2):
        cb, kb = clean_rows[b][None], corrupt_rows[b][None]
        one = circuits.evaluate_circuit(m, cb, kb, masks, answer=ans[b], wrong=wrong[b])
        np.testing.assert_allclose(circ.per_prompt[:, :, b], one.per_prompt[:, :, 0], atol=2e-5, rtol=0)  # float32
        onep = circuits.path_patch(m, cb, kb, answer=ans[b], wrong=wrong[b], **pp)
        np.testing.assert_allclose(path.per_prompt[..., b], onep.per_prompt[..., 0], atol=2e-5, rtol=0)
        onee = edges.exact_edge_patch(m, cb, kb, [("L0H1", "L2KV1.k"), ("MLP0", "logits")], answer=ans[b],
                                      wrong=wrong[b])
        np.testing.assert_allclose(edge[:, b], onee[:, 0], atol=2e-5, rtol=0)
    assert np.ptp(circ.per_prompt[:, 0, 0]) > 1e-2 and np.abs(path.effects()).max() > 1e-3
