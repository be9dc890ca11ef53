import json, re
import os
D = os.environ.get("DATA", "../shared/data"); O = "/tmp/lmcheck/data"
os.makedirs(O, exist_ok=True)

def split_choices(text):
    pos, start = [], 0
    for L in "ABCD":
        m = f"({L})"; at = text.find(m, start); assert at >= 0, text
        pos.append((at, at + len(m))); start = at + len(m)
    ends = [p[0] for p in pos[1:]] + [len(text)]
    return [text[p[1]:e].strip() for p, e in zip(pos, ends)]

# OpenBookQA from the original TSV (allenai/openbookqa "main" schema)
lines = open(f"{D}/openbookqa/test.tsv", encoding="utf-8").read().splitlines()
hdr = lines[0].split("\t"); c = {n: hdr.index(n) for n in hdr}
fnd = [json.loads(l) for l in open(f"{D}/openbookqa/test.llmfoundry.jsonl", encoding="utf-8")]
with open(f"{O}/openbookqa_test.jsonl", "w") as f:
    n = 0
    for i, l in enumerate(x for x in lines[1:] if x.strip()):
        r = l.split("\t")
        ch = split_choices(r[c["Choices"]])
        doc = {"id": r[c["ID"]], "question_stem": r[c["Question Stem"]],
               "choices": {"text": ch, "label": ["A", "B", "C", "D"]}, "answerKey": r[c["Answer Key"]]}
        # cross-check with llm-foundry copy
        if fnd[i]["choices"] != ch or fnd[i]["query"] != doc["question_stem"] or fnd[i]["gold"] != "ABCD".index(doc["answerKey"].strip()):
            print("OBQA mismatch vs llmfoundry", i, ch, fnd[i]["choices"])
        f.write(json.dumps(doc) + "\n"); n += 1
    print("obqa", n)

# HellaSwag 6-line -> Rowan/hellaswag schema
hl = open(f"{D}/hellaswag/validation.txt", encoding="utf-8").read().splitlines()
while hl and not hl[-1].strip(): hl.pop()
assert len(hl) % 6 == 0
with open(f"{O}/hellaswag_validation.jsonl", "w") as f:
    for k, i in enumerate(range(0, len(hl), 6)):
        q = hl[i]; act, sep, ctx = q.partition(": ")
        assert sep, q
        doc = {"ind": k, "activity_label": act, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
               "endings": hl[i+2:i+6], "source_id": "", "split": "val", "split_type": "", "label": hl[i+1]}
        f.write(json.dumps(doc) + "\n")
    print("hellaswag", len(hl)//6)

# PIQA
docs = [json.loads(l) for l in open(f"{D}/piqa/validation.jsonl", encoding="utf-8") if l.strip()]
labs = [l for l in open(f"{D}/piqa/validation-labels.lst").read().splitlines() if l.strip()]
assert len(docs) == len(labs)
with open(f"{O}/piqa_validation.jsonl", "w") as f:
    for d, lab in zip(docs, labs):
        f.write(json.dumps({"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)}) + "\n")
    print("piqa", len(docs))
