#!/usr/bin/env python3
# Writes configs/data/corpus.txt, the corpus `zinf train` trains on by default: short stories,
# arithmetic facts and lists made from templates by this script (the project's own text, free of
# any license). Deterministic: the same seed gives the same bytes. Standard library only; any
# python3 runs it.
import random
import sys

NAMES = ["Ada", "Ben", "Cora", "Dev", "Elin", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora",
         "Otto", "Pia", "Quin", "Rosa", "Sami", "Tess"]
PLACES = ["the market", "the river", "the old mill", "the library", "the garden", "the harbour", "the hill",
          "the bakery", "the station", "the forest"]
THINGS = ["apple", "lamp", "book", "kite", "shell", "key", "map", "coin", "cup", "drum", "ribbon", "stone"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "silver"]
VERBS = [("found", "lost"), ("bought", "sold"), ("painted", "washed"), ("carried", "dropped"), ("hid", "showed")]
WEATHER = ["it was raining", "the sun was warm", "the wind was cold", "snow fell softly", "the sky was grey"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def story(r):
    a, b = r.sample(NAMES, 2)
    place = r.choice(PLACES)
    thing = r.choice(THINGS)
    colour = r.choice(COLOURS)
    v, w = r.choice(VERBS)
    n = r.randint(2, 9)
    lines = [
        f"One morning {r.choice(WEATHER)}, and {a} walked to {place}.",
        f"At {place}, {a} {v} a {colour} {thing}.",
        f"{a} showed the {colour} {thing} to {b}.",
        f"\"Where did you get it?\" asked {b}.",
        f"\"I {v} it at {place},\" said {a}.",
        f"Then {b} {w} {NUMBERS[n]} {thing}s, and {a} laughed.",
        f"In the evening {a} and {b} went home from {place}.",
    ]
    return " ".join(lines)


def arithmetic(r):
    out = []
    for _ in range(6):
        x, y = r.randint(0, 6), r.randint(0, 6)
        if r.random() < 0.5:
            out.append(f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}.")
        else:
            hi, lo = max(x, y), min(x, y)
            out.append(f"{NUMBERS[hi]} minus {NUMBERS[lo]} is {NUMBERS[hi - lo]}.")
    return " ".join(out)


def listing(r):
    name = r.choice(NAMES)
    items = r.sample(THINGS, 4)
    return f"{name} packed a bag: " + ", ".join(f"a {r.choice(COLOURS)} {t}" for t in items) + "."


def counting(r):
    start = r.randint(0, 5)
    return "Counting: " + ", ".join(NUMBERS[start:start + 7]) + "."


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "configs/data/corpus.txt"
    target = int(sys.argv[2]) if len(sys.argv) > 2 else 400_000
    r = random.Random(20261121)
    parts, size = [], 0
    kinds = [story, story, arithmetic, listing, counting]
    while size < target:
        p = r.choice(kinds)(r) + "\n\n"
        parts.append(p)
        size += len(p)
    text = "".join(parts)
    assert "@" not in text and ")zinf\"" not in text
    with open(out_path, "w", encoding="ascii", newline="\n") as f:
        f.write(text)
    print(f"wrote {out_path}: {len(text)} bytes")


if __name__ == "__main__":
    main()
