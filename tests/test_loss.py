"""The chunked training loss equals cross-entropy over the full logits, gradients included."""
import torch
import torch.nn.functional as F

from codellm.train import loss as loss_module
from codellm.train.data import IGNORE
from codellm.train.loss import next_token_loss

from conftest import make_model


def test_chunked_loss_and_gradients_match_full_cross_entropy(tokenizer, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # chunks that do not divide the rows
    model = make_model(tokenizer).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(4, tokenizer.vocab_size, (3, 20), generator=gen)
    y = torch.randint(4, tokenizer.vocab_size, (3, 20), generator=gen)
    y[0, :5] = IGNORE  # padding is left out of the loss and gets no gradient
    results = []
    for compute in (lambda: F.cross_entropy(model(x).view(-1, tokenizer.vocab_size), y.view(-1),
                                            ignore_index=IGNORE, reduction="sum"),
                    lambda: next_token_loss(model, x, y, reduction="sum")):
        model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    mean = next_token_loss(model, x, y)
    torch.testing.assert_close(mean, want / (y != IGNORE).sum(), atol=1e-5, rtol=1e-5)
