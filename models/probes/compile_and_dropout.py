import sys, random, time, torch
sys.path.insert(0, '.')  # run from the repository's root
from pathlib import Path
from models.train import load_base, TrainConfig, length_grouped_batches
from models.data import read_jsonl, LABELS
torch.set_num_threads(2)
ex = read_jsonl(Path('var/data/corpus/train.jsonl'))[:6000]
tok, model = load_base(Path('var/data/corpus/base-encoder'))
mode = sys.argv[1]
if 'nodrop' in mode:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout): m.p = 0.0
if 'noattndrop' in mode:
    model.config.attention_probs_dropout_prob = 0.0
    for n, m in model.named_modules():
        if n.endswith('attention.self') : m.dropout.p = 0.0
enc = tok([e.text for e in ex], truncation=True, max_length=64)['input_ids']
lab = [LABELS.index(e.label) for e in ex]
model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
batches = length_grouped_batches([len(x) for x in enc], TrainConfig(batch_size=32), random.Random(1))
model.train()
fwd = model
if 'compile' in mode:
    fwd = torch.compile(model, dynamic=True)
def step(b):
    inp = tok.pad({'input_ids': [enc[i] for i in b]}, return_tensors='pt'); y = torch.tensor([lab[i] for i in b])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = fwd(**inp, labels=y).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
t = time.perf_counter()
for b in batches[:3]: step(b)
warm = time.perf_counter() - t
t = time.perf_counter()
for b in batches[3:43]: step(b)
print(mode, 'warm', round(warm,1), 's;', round((time.perf_counter()-t)/40*1000), 'ms/step')
