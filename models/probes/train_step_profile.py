import sys, time, random, torch, contextlib
sys.path.insert(0, '.')  # run from the repository's root
from pathlib import Path
from models.train import load_base, TrainConfig, length_grouped_batches
from models.data import read_jsonl, LABELS
torch.set_num_threads(2)
ex = read_jsonl(Path('var/data/corpus/train.jsonl'))
tok, model = load_base(Path('var/data/corpus/base-encoder'))
enc = tok([e.text for e in ex], truncation=True, max_length=64)['input_ids']
lab = [LABELS.index(e.label) for e in ex]
lengths = [len(x) for x in enc]
bs = int(sys.argv[1]); fused = sys.argv[2] == 'fused'; freeze = sys.argv[3] == 'freeze'; prec = sys.argv[4]
if freeze: model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
batches = length_grouped_batches(lengths, TrainConfig(batch_size=bs), random.Random(1))
model.train()
T = {'pad':0,'fwd':0,'bwd':0,'clip':0,'opt':0}
n = 0
for k, b in enumerate(batches[:50]):
    t0 = time.perf_counter()
    inp = tok.pad({'input_ids': [enc[i] for i in b]}, return_tensors='pt'); y = torch.tensor([lab[i] for i in b])
    t1 = time.perf_counter()
    with (torch.autocast('cpu', dtype=torch.bfloat16) if prec == 'bf16' else contextlib.nullcontext()):
        loss = model(**inp, labels=y).loss
    t2 = time.perf_counter(); loss.backward(); t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0); t4 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True); t5 = time.perf_counter()
    if k >= 5:
        n += 1
        for key, v in zip(T, (t1-t0, t2-t1, t3-t2, t4-t3, t5-t4)): T[key] += v
print(sys.argv[1:], {k: round(1000*v/n,1) for k,v in T.items()}, 'total', round(1000*sum(T.values())/n,1))
