"""Pass graphs (speedtune.training.graphs) on the real training stack: the embedded SmolLM2-135M loaded by Unsloth in nf4 with
its LoRA (dropout 0.1, so each pass draws random masks), in bf16 and in fp16 with a loss-scale factor, two passes a
step (a padded one and a packed one) on real conversations. A replayed step must give the eager step's loss and
LoRA gradients. Needs a CUDA GPU and Unsloth: it runs on the device machine (its log is in benchmarks/results/) and
is skipped elsewhere. Run it in a pytest process of its own: Unsloth's import patches transformers' Llama for
every later model of the process.

The tolerance: the two runs draw the same dropout masks (the generator is seeded before each pass; a replay reads
the generator's seed and offset), so they differ only by rounding, and the test asserts that this difference is
at least 10x smaller than what a different dropout draw changes (`noise`), measured in the same test. At LoRA's
initialisation (B = 0) the loss doesn't depend on the draw, so there it must match to 1e-6; the gradients do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and Unsloth)")

ROWS = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "dpo-en-demo-chosen-train.jsonl"


def unsloth_lora(path, dtype, dropout=0.1):
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=1024, dtype=dtype,
                                                   load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=dropout, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                                             use_gradient_checkpointing=False, random_state=0)
    return model, tok


def real_rows(tok, n=6, cap=160):
    """n real conversations as (ids, labels): the prompt unlabelled, the answer labelled, cut to `cap` tokens."""
    from speedtune.training.graphs import IGNORE

    rows = []
    for line in ROWS.read_text().splitlines()[:n]:
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
        whole = tok.apply_chat_template(msgs, tokenize=False)
        p, ids = tok(prompt, add_special_tokens=False).input_ids, tok(whole, add_special_tokens=False).input_ids[:cap]
        rows.append((ids, [IGNORE] * len(p) + ids[len(p):]))
    return rows


def passes(tok, rows):
    """A step's two passes: three rows padded on the right to a width of 192, and three rows packed (speedtune's
    pack, padded to 512 with their row numbers)."""
    from speedtune.training.graphs import IGNORE
    from speedtune.training.trainer import pack

    def padded(group, width):
        ids = torch.full((len(group), width), tok.pad_token_id or 0)
        labels = torch.full((len(group), width), IGNORE)
        for r, (i, l) in enumerate(group):
            ids[r, :len(i)], labels[r, :len(l)] = torch.tensor(i), torch.tensor(l)
        return ids.cuda(), labels.cuda()

    ids, labels = padded(rows[:3], 192)
    second = rows[3:]
    pids, plabels = padded(second, 192)
    micro = pack({"input_ids": pids, "labels": plabels}, [len(i) for i, _ in second], [0, 1, 2], True, 512,
                 tok.pad_token_id or 0)
    n = int((labels[:, 1:] != IGNORE).sum()) + int((micro["labels"] != IGNORE).sum())
    return n, [(ids, labels), (micro["input_ids"], micro["labels"], micro["position_ids"], micro["segments"])]


def step(graphs, n, batches, scale, seed):
    graphs.begin_step(n, scale)
    loss = 0.0
    for k, inputs in enumerate(batches):
        torch.cuda.manual_seed(seed + k)  # the same dropout masks for the eager and the replayed pass
        loss += graphs.run(*inputs).item()
    graphs.end_step()
    return loss, [g.detach().float().clone() for g in graphs.grads]


def rel(a, b):
    return (torch.cat([x.flatten() for x in a]) - torch.cat([x.flatten() for x in b])).norm().item() / \
        torch.cat([x.flatten() for x in b]).norm().item()


@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 1.0), (torch.float16, 1024.0)], ids=["bf16", "fp16"])
def test_replayed_unsloth_nf4_steps_equal_the_eager_steps(smollm2, dtype, scale):
    from speedtune.training.graphs import PassGraphs

    model, tok = unsloth_lora(smollm2, dtype)
    model.train()
    n, batches = passes(tok, real_rows(tok))
    eager = PassGraphs(model, dtype, record=False, float_mask=True)
    graphed = PassGraphs(model, dtype, record=True, float_mask=True)
    step(graphed, n, batches, scale, 0)  # records both shapes (warm-up passes included)
    assert graphed.failed is None and len(graphed.graphs) == 2, graphed.failed
    for seed in (11, 23, 37):
        want_loss, want = step(eager, n, batches, scale, seed)
        other_loss, other = step(eager, n, batches, scale, seed + 1000)  # another dropout draw
        got_loss, got = step(graphed, n, batches, scale, seed)
        assert all(torch.isfinite(g).all() for g in got) and want_loss > 0.5
        noise_loss, noise = abs(other_loss - want_loss) / want_loss, rel(other, want)
        err_loss, err = abs(got_loss - want_loss) / want_loss, rel(got, want)
        print(f"{dtype} seed {seed}: loss {want_loss:.5f} eager, {got_loss:.5f} replayed (rel {err_loss:.2e}; "
              f"another draw {noise_loss:.2e}); gradients rel {err:.2e} (another draw {noise:.2e})")
        assert noise > 1e-3  # dropout is on: a different draw changes the gradients
        assert err_loss <= noise_loss / 10 + 1e-6 and err <= noise / 10
    assert graphed.replays == 2 * 4 and graphed.eager_passes == 0
