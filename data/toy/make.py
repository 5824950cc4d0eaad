"""Write the bundled toy preference data: `python data/toy/make.py` (deterministic).

The preference is one a tiny model can learn in a couple of minutes: the prompt asks for a cheerful or
a gloomy remark, and the answer in the asked-for mood wins. Eval topics never appear in training, so
eval accuracy measures a learned preference, not memorised rows.
"""

import json
import random
from pathlib import Path

TOPICS = [
    "the moon",
    "rain",
    "bread",
    "a river",
    "the ocean",
    "a bicycle",
    "coffee",
    "a garden",
    "winter",
    "a library",
    "music",
    "a volcano",
    "the forest",
    "a bridge",
    "tea",
    "a camera",
    "the desert",
    "a clock",
    "snow",
    "a train",
    "honey",
    "a lamp",
    "the wind",
    "a map",
    "cheese",
    "a castle",
    "thunder",
    "a kite",
    "rice",
    "a violin",
    "the sun",
    "a boat",
    "apples",
    "a tiger",
    "glass",
    "a mountain",
    "paper",
    "a whale",
    "soup",
    "an island",
    "a candle",
    "chess",
    "a bee",
    "the sky",
    "a key",
    "salt",
    "a horse",
    "a cloud",
    "a pencil",
    "an owl",
    "a farm",
    "a mirror",
    "a robot",
    "a comet",
    "a cave",
    "wool",
    "a lighthouse",
]
EVAL_TOPICS = [
    "a desert fox",
    "a glacier",
    "a telescope",
    "a canyon",
    "a lemon",
    "a harbour",
    "a beetle",
    "a waterfall",
]
QUESTIONS = [
    "Tell me something {mood} about {t}.",
    "Write a {mood} sentence on {t}.",
    "Describe {t} in a {mood} way.",
    "Give me a {mood} remark about {t}.",
]
SYSTEMS = [None, "You are a helpful assistant.", "Answer briefly."]
# The same words appear as chosen and as rejected across the data: only the mood the prompt asks for
# decides which answer wins, so the model must read the prompt, not just learn a favourite reply.
ANSWERS = {
    "cheerful": [
        "{T} is wonderful and bright, and it always makes people smile.",
        "I love {t}! It is lovely, warm and full of joy.",
        "What a delight {t} is. It brings happiness to everyone.",
    ],
    "gloomy": [
        "{T} is dull and grey, and it always makes people sigh.",
        "I dread {t}. It is cold, bleak and full of sorrow.",
        "What a burden {t} is. It brings sadness to everyone.",
    ],
}


def rows(topics, n, rng):
    seen = set()
    while len(seen) < n:
        t = rng.choice(topics)
        fill = {"t": t, "T": t[0].upper() + t[1:]}
        mood, other = rng.sample(sorted(ANSWERS), 2)
        prompt = [{"role": "user", "content": rng.choice(QUESTIONS).format(mood=mood, **fill)}]
        system = rng.choice(SYSTEMS)
        if system:
            prompt.insert(0, {"role": "system", "content": system})
        row = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": rng.choice(ANSWERS[mood]).format(**fill)}],
            "rejected": [{"role": "assistant", "content": rng.choice(ANSWERS[other]).format(**fill)}],
        }
        key = json.dumps(row)
        if key not in seen:  # no duplicate pairs: the converter would (rightly) drop them
            seen.add(key)
            yield row


def main():
    here = Path(__file__).parent
    rng = random.Random(0)
    for name, topics, n in [("train", TOPICS, 1000), ("eval", EVAL_TOPICS, 128)]:
        lines = [json.dumps(r) for r in rows(topics, n, rng)]
        (here / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
