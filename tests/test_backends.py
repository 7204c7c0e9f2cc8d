"""The backend seam's helpers. Offloading the input embeddings only happens on a GPU (the memory profile; proven by
`speedtune bench`, see benchmarks/results); here the CPU lookup it installs is checked to give the same loss and
gradients as the module's own forward, and the cases where it must not apply are checked to be left alone."""

import types

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speedtune.training.backends import lookup_on_cpu, offload_input_embeddings


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_cpu_lookup_gives_the_same_loss_and_gradients():
    model = _model(tied=False)
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(False)  # frozen, as in LoRA training
    # the hook that gradient checkpointing relies on must still run after the forward is replaced
    model.enable_input_require_grads()
    ids = torch.tensor([[0, 5, 17, 299, 42, 0, 7]])
    before = _loss_and_grads(model, ids)
    emb.forward = types.MethodType(lookup_on_cpu, emb)
    after = _loss_and_grads(model, ids)
    assert after[0] == before[0]
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    out = emb(ids)
    assert out.requires_grad and out.shape == (1, 7, 32)  # the require-grad hook survived


def test_offload_leaves_tied_trained_or_cpu_tables_alone():
    tied = _model(tied=True)
    assert offload_input_embeddings(tied) is False
    untied = _model(tied=False)
    assert offload_input_embeddings(untied) is False  # trained (requires grad) and already in CPU memory
    untied.get_input_embeddings().weight.requires_grad_(False)
    assert offload_input_embeddings(untied) is False  # frozen, but nothing to gain on a CPU
    assert untied.get_input_embeddings().forward.__func__ is torch.nn.Embedding.forward


def test_offloaded_table_is_no_parameter_and_gives_the_same_loss():
    """The move itself (forced on a CPU: the only device here): the table leaves the parameters, so the Trainer's
    `model.to(device)` can't move it back, and the loss and LoRA-style gradients are unchanged."""
    model = _model(tied=False)
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(False)
    ids = torch.tensor([[3, 5, 17, 299, 42, 8, 7]])
    before = _loss_and_grads(model, ids)
    assert offload_input_embeddings(model, force=True) is True
    assert "weight" not in dict(emb.named_parameters()) and isinstance(emb.weight, torch.Tensor)
    assert not any(p is emb.weight for p in model.parameters())
    model.to("cpu")
    assert emb.forward.__func__ is lookup_on_cpu
    after = _loss_and_grads(model, ids)
    assert after[0] == before[0]
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
