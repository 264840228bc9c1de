import sys, torch
sys.path.insert(0, '.')  # run from the repository's root
from pathlib import Path
from models.data import read_jsonl, LABELS
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d); model = AutoModelForSequenceClassification.from_pretrained(d).eval()
val = read_jsonl(Path('var/data/corpus/validation.jsonl'))
def ids(text, head):
    x = tok(text)['input_ids']
    if len(x) <= 64: return x
    return x[:head] + x[-(64-head):] if head < 64 else x[:63] + [x[-1]]
for head in (64, 32, 16, 8):
    for src in ('pang_lee_reviews', 'rt_reviews', 'vader_movies'):
        sub = [e for e in val if e.source == src]
        ok = 0; long = 0
        with torch.inference_mode():
            for e in sub:
                x = ids(e.text, head); long += len(tok(e.text)['input_ids']) > 64
                y = model(input_ids=torch.tensor([x])).logits.argmax(-1).item()
                ok += LABELS[y] == e.label
        print(head, src, len(sub), 'long', long, 'acc', round(100*ok/len(sub),1))
