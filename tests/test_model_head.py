"""The LM head's CPU backward (model.transformer.project_to_vocab) gives F.linear's gradients."""

import torch
import torch.nn.functional as F

from model.transformer import _CPUVocabProjection, project_to_vocab


def test_gradcheck():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_CPUVocabProjection.apply, (h, w))


def test_matches_f_linear_with_a_tied_weight():
    torch.manual_seed(0)
    emb = torch.randn(64, 8, requires_grad=True)
    idx = torch.randint(0, 64, (4, 16))
    grads = []
    for project in (project_to_vocab, F.linear):
        emb.grad = None
        h = torch.tanh(emb[idx])
        F.cross_entropy(project(h, emb).flatten(0, 1), idx.flatten()).backward()
        grads.append(emb.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_frozen_weight_gets_no_gradient():
    h = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(10, 8)
    project_to_vocab(h, w).sum().backward()
    torch.testing.assert_close(h.grad, w.sum(0).expand(3, 8))
