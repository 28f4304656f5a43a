"""A small built-in English corpus, generated from templates, so the quickstart needs no download.

The documents are short, varied and deterministic for a seed: everyday stories, number facts,
arithmetic questions with answers, and definitions. They are not meant to teach anything in
particular; they give the teacher familiar text whose next-token distributions the student
learns to match.
"""

from __future__ import annotations

import random

_NAMES = [
    "Ada",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Leo",
    "Maya",
    "Nina",
    "Omar",
    "Paula",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
_PLACES = [
    "the market",
    "the library",
    "the park",
    "the station",
    "the beach",
    "the school",
    "the bakery",
    "the museum",
    "the garden",
    "the river",
    "the old bridge",
    "the farm",
]
_OBJECTS = [
    "apples",
    "books",
    "pencils",
    "flowers",
    "stamps",
    "shells",
    "cookies",
    "marbles",
    "cards",
    "coins",
    "eggs",
    "oranges",
]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy", "bright", "cloudy"]
_FEELINGS = ["happy", "tired", "curious", "proud", "surprised", "calm", "excited", "hungry"]
_ACTIONS = [
    "read a story",
    "drew a map",
    "baked bread",
    "fixed a bicycle",
    "wrote a letter",
    "planted seeds",
    "painted a fence",
    "cleaned the kitchen",
    "sang a song",
]
_TERMS = {
    "a prime number": "a whole number greater than one whose only divisors are one and itself",
    "a river": "a large natural stream of water that flows towards the sea or a lake",
    "a library": "a place where books are kept for people to read or borrow",
    "photosynthesis": "the process by which plants use sunlight to turn water and carbon "
    "dioxide into sugar and oxygen",
    "an even number": "a whole number that can be divided by two without a remainder",
    "gravity": "the force that pulls objects towards each other, such as towards the Earth",
    "a triangle": "a flat shape with three straight sides and three angles",
    "a verb": "a word that describes an action, a state or an event",
    "a planet": "a large body that moves around a star, like the Earth around the Sun",
    "a fraction": "a number that stands for a part of a whole, such as one half",
}
_OPS = {
    "+": ("plus", lambda a, b: a + b),
    "-": ("minus", lambda a, b: a - b),
    "*": ("times", lambda a, b: a * b),
}


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    place = rng.choice(_PLACES)
    obj = rng.choice(_OBJECTS)
    n, m = rng.randint(2, 12), rng.randint(1, 9)
    sentences = [
        f"It was a {rng.choice(_WEATHER)} morning when {name} walked to {place}.",
        f"There {name} met {friend}, who had {n} {obj} in a basket.",
        f"{friend} gave {m} of them to {name}, and {friend} had {max(n - m, 0)} {obj} left.",
        f"After lunch they {rng.choice(_ACTIONS)} together.",
        f"By the evening {name} felt {rng.choice(_FEELINGS)} and went home.",
    ]
    return " ".join(sentences[: rng.randint(3, len(sentences))])


def _number_facts(rng: random.Random) -> str:
    n = rng.randint(2, 99)
    facts = [
        f"The number {n} is {'even' if n % 2 == 0 else 'odd'}.",
        f"The next number after {n} is {n + 1}, and the one before it is {n - 1}.",
        f"Twice {n} is {2 * n}, and {n} squared is {n * n}.",
        f"{n} has {len(str(n))} digit{'s' if n > 9 else ''}.",
    ]
    rng.shuffle(facts)
    return " ".join(facts)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        op = rng.choice(list(_OPS))
        word, fn = _OPS[op]
        a, b = rng.randint(1, 50), rng.randint(1, 12 if op == "*" else 50)
        if rng.random() < 0.5:
            lines.append(f"Question: What is {a} {op} {b}?\nAnswer: {a} {op} {b} = {fn(a, b)}.")
        else:
            lines.append(f"Question: What is {a} {word} {b}?\nAnswer: {fn(a, b)}.")
    return "\n\n".join(lines)


def _definition(rng: random.Random) -> str:
    term, meaning = rng.choice(list(_TERMS.items()))
    return f"What is {term}? {term[0].upper() + term[1:]} is {meaning}."


_KINDS = (_story, _story, _number_facts, _arithmetic, _definition)


def builtin_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """Generate the built-in corpus.

    Args:
        num_documents: how many documents to generate.
        seed: the same seed always gives the same documents.

    Returns:
        A list of short English documents.
    """
    rng = random.Random(seed)
    return [rng.choice(_KINDS)(rng) for _ in range(num_documents)]
