import sys, json, time, torch, os
os.environ.setdefault('OMP_NUM_THREADS', '2')
sys.path.insert(0, '.')  # run from the repository's root
from pathlib import Path
from collections import defaultdict
import models.train as T
from models.train import TrainConfig, train
from models.data import read_jsonl, LABELS
from models.runtime import head_and_tail
from transformers import AutoModelForSequenceClassification, AutoTokenizer
name = sys.argv[1]; kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
root = Path('var/data/corpus')
out = Path('var/probes/runs') / name
ex = read_jsonl(root / 'train.jsonl')
drop = kw.pop('drop_sources', [])
ex = [e for e in ex if e.source not in drop]
cfg = TrainConfig(**kw)
captured = {}
orig_load = T.load_base
def load_base(d):
    tok, m = orig_load(d); captured['m'] = m; return tok, m
T.load_base = load_base
class Bar(T.tqdm):
    def close(self):
        super().close()
        if 'm' in captured and not captured.get('saved'):
            captured['saved'] = True
            captured['m'].save_pretrained(str(out) + '-final')
T.tqdm = Bar
t = time.perf_counter()
stats = train(root / 'base-encoder', ex, cfg, out)
train_s = time.perf_counter() - t
tok = AutoTokenizer.from_pretrained(str(out))
def evaluate(d):
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    res = {}
    for split in ('validation', 'out_of_source', 'reviews_test'):
        data = read_jsonl(root / f'{split}.jsonl')
        ids = [head_and_tail(x, 64, cfg.head_tokens) for x in tok([e.text for e in data], verbose=False)['input_ids']]
        correct = defaultdict(list)
        order = sorted(range(len(data)), key=lambda i: len(ids[i]))
        preds = {}
        with torch.inference_mode():
            for s in range(0, len(order), 64):
                idx = order[s:s+64]; w = max(len(ids[i]) for i in idx)
                x = torch.tensor([ids[i] + [0] * (w - len(ids[i])) for i in idx])
                p = model(input_ids=x, attention_mask=(x != 0).long()).logits.argmax(-1).tolist()
                for i, y in zip(idx, p): preds[i] = y
        for i, e in enumerate(data):
            correct[e.source].append(LABELS[preds[i]] == e.label)
        allc = [c for v in correct.values() for c in v]
        res[split] = round(100 * sum(allc) / len(allc), 2)
        res[split + '_by_source'] = {k: round(100 * sum(v) / len(v), 1) for k, v in correct.items()}
    return res
res = {'name': name, 'cfg': kw, 'train_s': round(train_s), 'stats': stats, 'averaged': evaluate(str(out))}
if captured.get('saved'): res['final'] = evaluate(str(out) + '-final')
print(json.dumps(res))
with open('var/probes/results.jsonl', 'a') as f: f.write(json.dumps(res) + '\n')
