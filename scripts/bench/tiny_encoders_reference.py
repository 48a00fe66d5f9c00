"""The PyTorch numbers of the tiny-encoder gradient tests in crates/taskrel-models/tests/models.rs
(bert_gradients_reach_every_weight_and_match_pytorch, mpnet_gradients_..._match_pytorch), and
sentence-transformers' all-mpnet-base-v2 embeddings of mpnet_matches_sentence_transformers.

    TASKREL_SAVE_TINY_MODELS=/tmp/tiny cargo test -p taskrel-models --test models -- gradients
    python3 scripts/bench/tiny_encoders_reference.py /tmp/tiny data

Needs torch, transformers (MPNet's and BERT's modules) and sentence-transformers; checked with
torch 1.13 (Debian's python3-torch), transformers 4.36.2, sentence-transformers 2.3.1.
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import (BertConfig, BertModel, MPNetConfig, MPNetModel,
                          PreTrainedTokenizerFast)

TEXTS = {
    "bert": ["The quick brown fox jumps over the lazy dog near the river bank today.",
             "Stocks fell sharply on Monday.", "Scientists discover a new frog"],
    "mpnet": ["The quick brown fox jumps over the lazy dog near the river bank today, while the "
              "farmer watches from the old wooden fence and counts his sheep twice before sunset.",
              "Stocks fell sharply on Monday.", "Scientists discover a new frog"],
}
MAX_LEN = {"bert": 16, "mpnet": 32}
CLASSES = {"bert": (BertConfig, BertModel), "mpnet": (MPNetConfig, MPNetModel)}


def gradients(saved, data, family):
    spec = json.load(open(f"{saved}/{family}/taskrel.json"))
    config_class, model_class = CLASSES[family]
    model = model_class(config_class(**spec["bert"]), add_pooling_layer=False)
    state = load_file(f"{saved}/{family}/model.safetensors")
    encoder = {k: v for k, v in state.items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.train()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{data}/models/all-MiniLM-L6-v2/tokenizer.json")
    enc = tok(TEXTS[family], padding="longest", truncation=True, max_length=MAX_LEN[family],
              return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(2).float()
    f = (out * mask).sum(1) / mask.sum(1)
    n, d = f.shape
    w = torch.tensor([((k * 7 % 11) - 5.0) / 5.0 for k in range(n * d)]).reshape(n, d)
    loss = (f * w).sum() + (f ** 2).sum()
    loss.backward()
    print(family, "lengths", enc["attention_mask"].sum(1).tolist(), "loss", loss.item())
    print("  features", [round(x, 6) for x in f[0, :4].tolist()])
    print("  norms", [round(p.grad.norm().item(), 6) for _, p in sorted(model.named_parameters())])


def embeddings(data):
    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer(f"{data}/models/all-mpnet-base-v2", device="cpu")
    for s in ["This is an example sentence", "Stocks fell sharply on Monday."]:
        print("all-mpnet-base-v2", repr(s), [round(float(x), 4) for x in m.encode(s)[:5]])


if __name__ == "__main__":
    saved, data = sys.argv[1:3]
    for family in ("bert", "mpnet"):
        gradients(saved, data, family)
    embeddings(data)
