"""One-off probe: the [CLS] head against the mean of the token vectors, same batches and steps.

    python models/probe_pooling.py cls 600
    python models/probe_pooling.py mean 600

Prints the validation and out-of-source accuracy of each (fp32). Recorded in docs/decisions.md
(The mean of the token vectors, not the [CLS] token); removed from the tree after this commit.
"""
import sys, time, types
from pathlib import Path
import torch
import models.train as T
from models.data import prepare, read_jsonl, DEFAULT_DATA_DIR, LABELS
from models.runtime import head_and_tail

mode = sys.argv[1]; steps = int(sys.argv[2])
orig = T.load_base
def load_base(d):
    tok, model = orig(d)
    if mode == "mean":
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kw):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
            logits = self.classifier(self.dropout(pooled))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
            return types.SimpleNamespace(loss=loss, logits=logits)
        model.forward = types.MethodType(forward, model)
    KEEP.append((tok, model))
    return tok, model
KEEP=[]
T.load_base = load_base
corpus = prepare(DEFAULT_DATA_DIR, log=lambda m: None)
cfg = T.TrainConfig(max_steps=steps, epochs=steps*64/56451+0.01, freeze_word_embeddings=False)
# total steps = steps; schedule over those steps
import dataclasses
tok_model = {}
orig_save = None
stats = T.train(corpus.encoder, read_jsonl(corpus.train), cfg, Path(f"/tmp/pool-{mode}"))
print(stats["seconds_per_step"], flush=True)

tok, model = KEEP[0]
model.eval()
def acc(path):
    ex = read_jsonl(path)
    right = 0
    with torch.inference_mode():
        for i in range(0, len(ex), 64):
            b = ex[i:i+64]
            ids = [head_and_tail(x, 64, 16) for x in tok([e.text for e in b])["input_ids"]]
            inp = tok.pad({"input_ids": ids}, return_tensors="pt")
            logits = model(**inp).logits
            right += sum(int(LABELS[j] == e.label) for j, e in zip(logits.argmax(-1).tolist(), b))
    return right / len(ex)
print(mode, steps, "val %.4f oos %.4f" % (acc(corpus.validation), acc(corpus.out_of_source)), flush=True)
