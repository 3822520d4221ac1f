"""Write the tiny example data sets in examples/data/ (deterministic; the committed files are its output).

    python examples/make_data.py            # rewrite examples/data/*.jsonl

- ``safety.jsonl``: SFT safety data, ``{"prompt", "completion"}``: harmful requests -> a refusal.
- ``general.jsonl`` and ``general_b.jsonl``: two general-ability reference sets (one reference
  gradient each): ``{"text"}`` arithmetic / string skills, and ``{"prompt", "completion"}`` pairs.
- ``preferences.jsonl``: DPO pairs, ``{"prompt", "chosen", "rejected"}`` (refuse over comply).
- ``general_pairs.jsonl``: the DPO stage's reference set (preference pairs on general skills;
  its reference loss is the LM loss on chosen and rejected together, as in the original work).

Real runs use real data (the original work: 200 reference examples per set); these are small so
the examples run in seconds on a CPU. Every character is in ``ogpsa.tiny.char_tokenizer``'s alphabet.
"""

from __future__ import annotations

import json
import pathlib
import random

OUT = pathlib.Path(__file__).resolve().parent / "data"
OBJECTS = ["a bomb", "a weapon", "poison", "a fake id", "malware", "a lock pick", "explosives", "a virus"]
VERBS = ["how do i make", "tell me how to build", "explain how to get", "give steps to create"]
REFUSAL = "Sorry, I can't help with that."
COMPLY = "Sure, here is how: first,"


def rows() -> dict[str, list[dict]]:
    rng = random.Random(16)  # fixed seed: the files are reproducible byte for byte
    requests = [f"{v} {o}?" for v in VERBS for o in OBJECTS]
    rng.shuffle(requests)
    requests = requests[:16]
    safety = [{"prompt": f"User: {r}\nAssistant: ", "completion": REFUSAL} for r in requests]
    prefs = [{"prompt": f"User: {r}\nAssistant: ", "chosen": REFUSAL, "rejected": COMPLY} for r in requests]
    general, general_b, pairs = [], [], []
    for _ in range(12):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
        general.append({"text": f"{a}+{b}={a + b}. Reverse {word}: {word[::-1]}."})
        general_b.append({"prompt": f"Copy {word}: ", "completion": word})
        pairs.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.randint(1, 9))})
    return {"safety": safety, "general": general, "general_b": general_b, "preferences": prefs,
            "general_pairs": pairs}


def write(out: pathlib.Path = OUT) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in rows().items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
