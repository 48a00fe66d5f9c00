"""PyTorch train-step time for the models of `taskrel bench train`, same batch and threads.

lenet200: the same layers (conv20-5, pool, conv50-5, pool, dropout, dense 200, dropout, head)
on MNIST-shaped input; minilm: transformers' BertModel from the local MiniLM folder with mean
pooling and a linear head, at sequence length 128. AdamW, cross-entropy, one warm-up step.
Usage: python torch_train_step.py lenet200|minilm BATCH STEPS [MODEL_DIR]"""
import json, resource, sys, time

import torch
from torch import nn

kind, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)

if kind == "lenet200":
    model = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.5), nn.Flatten(), nn.Linear(800, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 10))
    make = lambda: (torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,)))
    forward = model
else:
    from transformers import BertModel
    bert = BertModel.from_pretrained(sys.argv[4])
    head = nn.Linear(bert.config.hidden_size, 4)
    model = nn.ModuleList([bert, head])
    def make():
        ids = torch.randint(1000, 30000, (batch, 128)); ids[:, 0] = 101; ids[:, -1] = 102
        return (ids, torch.ones(batch, 128, dtype=torch.long)), torch.randint(0, 4, (batch,))
    def forward(x):
        ids, mask = x
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return head(pooled)

opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
loss_fn = nn.CrossEntropyLoss()
model.train()
def step():
    x, y = make()
    opt.zero_grad()
    loss = loss_fn(forward(x), y)
    loss.backward()
    opt.step()
step()
start = time.perf_counter()
for _ in range(steps):
    step()
ms = (time.perf_counter() - start) * 1e3 / steps
print(json.dumps({"model": kind, "batch": batch, "ms_per_step": ms, "threads": torch.get_num_threads(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__}))
