"""Greedy answers of the shipped demo for three requests, fused and merged, as JSON (token ids): run it in two
checkouts and compare, to check that an engine rewrite keeps the shipped model's answers.

    python bench/shipped_tokens.py CHECKOUT > tokens.json
"""
import sys, json, torch
root = sys.argv[1]; sys.path[:0] = [root]
from atmoe import ATMoE
torch.set_num_threads(1)
m = ATMoE.load(root + "/assets/coadapted/experts.json", device="cpu")
note = "Note: 67-year-old woman. T 38.9, HR 118, RR 24, SpO2 93%. Na 131, K 5.8, Hb 10.1, WBC 15.2, creatinine 1.9."
out = {}
for q in ("List the vital signs as bullet points.", "List the lab results and flag each as low, normal or high.", "Explain the lab results in plain words."):
    for merge in (False, True):
        out[f"{q}|{merge}"] = m.generate(q, input=note, max_new_tokens=48, merge=merge).token_ids
print(json.dumps(out))
