"""Failure-mode examples and CPU per text of stored models (for the model card)."""
import sys, time, statistics, json
sys.path.insert(0, '.')  # run from the repository's root
from models import runtime
from models.data import read_jsonl
from pathlib import Path
tags = sys.argv[1:] or ['sentiment-minilm-int8:latest', 'sentiment-minilm:latest']
cases = [
    ("negation", "The food was not bad at all."),
    ("negation", "I wouldn't say it was good."),
    ("negation", "Not the worst film I've seen this year."),
    ("sarcasm", "Oh great, another update that breaks everything. Just what I needed."),
    ("sarcasm", "Wow, waited two hours for cold soup. Fantastic service."),
    ("mixed", "The battery life is amazing, but the screen cracked within a week."),
    ("mixed", "Great actors, terrible script."),
    ("mixed", "It's fine for the price, I guess, though the strap feels cheap."),
    ("neutral", "The package arrived on Tuesday."),
    ("long, verdict at the end", "The film opens with a long, slow sequence in a small town, " * 6 + "In the end it was a complete waste of two hours."),
]
texts = read_jsonl(Path('var/data/corpus/validation.jsonl'))
texts = [e.text for e in texts]
for tag in tags:
    p = runtime.load(tag, threads=1)
    print('##', tag)
    for kind, text in cases:
        r = p.predict([text])[0]
        print(f'| {kind} | {text[:90]}{"..." if len(text) > 90 else ""} | {r.label} {r.score:.2f} |')
    for size in (1, 8, 32):
        cpu = []
        for rep in range(7):
            t = time.process_time(); n = 0
            for i in range(0, 512, size):
                p.predict(texts[i:i+size]); n += len(texts[i:i+size])
            cpu.append((time.process_time() - t) / n * 1000)
        print(f'cpu per text at batch {size}: median {statistics.median(cpu):.2f} ms (1 thread, 512 validation texts, 7 runs)')
