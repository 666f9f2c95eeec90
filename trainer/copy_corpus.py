"""Copy-teaching text for the demo model: records whose values must be copied into a sentence.

The demo and table-to-text tasks need a model that can copy a value from its input into its
answer (an induction-head skill); a corpus of restaurant sentences with names drawn from a
short list only teaches it to recall one of those names. These documents teach copying in
*other* domains (books, trains, people, products, parcels) with values drawn from huge random
pools (made-up names and towns, random numbers), so that predicting a value is only possible
by finding it earlier in the document:

    title[Marvel Tosk], author[Pela Onridge], year[1987] => Marvel Tosk is a book by Pela ...
    Dorin said: kalu 58 vespin. Repeat: kalu 58 vespin.

The restaurant, greeting and weather domains of the demo tasks never appear here, and none of
the generated values is a restaurant name or a city of the weather task.
"""

from __future__ import annotations

import random

SYLLABLES = (
    "ka lo mi ra ven tor sel bri da nu pel on ar is gan fe lu mor ti sha wen bo cal dri "
    "es har jo ket lin mar nor pa quin ro sut tav ul vin yor zan"
).split()
TOWN_ENDS = ["ton", "ford", "by", "ham", "well", "field", "mouth", "bridge", "wick", "stead"]
JOBS = ["teacher", "nurse", "farmer", "pilot", "painter", "baker", "doctor", "builder", "singer", "driver"]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "silver", "orange", "purple"]
PRODUCTS = ["lamp", "kettle", "bicycle", "chair", "radio", "backpack", "camera", "clock", "desk", "tent"]
WORDS = (
    "apple river stone window garden silver morning paper candle forest bottle yellow "
    "orange pencil basket winter summer ladder mirror button pocket rabbit island"
).split()


def made_up_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable random word, capitalised: far too many of them to memorise."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables))).capitalize()


def person(rng: random.Random) -> str:
    return f"{made_up_word(rng, (1, 2))} {made_up_word(rng)}"


def town(rng: random.Random) -> str:
    return made_up_word(rng, (1, 2)) + rng.choice(TOWN_ENDS)


def _title(rng: random.Random) -> str:
    return rng.choice([f"The {rng.choice(WORDS).capitalize()} of {made_up_word(rng)}", made_up_word(rng)])


def _book(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    v = {"title": _title(rng), "author": person(rng), "year": str(rng.randint(1850, 2024)),
         "pages": str(rng.randint(40, 900))}  # fmt: skip
    t, a, y, p = v["title"], v["author"], v["year"], v["pages"]
    return v, [
        f"{t} is a book by {a}, published in {y}. It has {p} pages.",
        f"{a} wrote {t} in {y}. The book is {p} pages long.",
        f"Published in {y}, {t} by {a} runs to {p} pages.",
    ]


def _train(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    v = {"from": town(rng), "to": town(rng), "time": f"{rng.randint(5, 23)}:{rng.randint(0, 59):02d}",
         "platform": str(rng.randint(1, 14))}  # fmt: skip
    f, t, h, p = v["from"], v["to"], v["time"], v["platform"]
    return v, [
        f"The {h} train from {f} to {t} leaves from platform {p}.",
        f"Trains to {t} leave {f} at {h} from platform {p}.",
        f"Platform {p}: the train from {f} to {t} departs at {h}.",
    ]


def _person(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    v = {"name": person(rng), "job": rng.choice(JOBS), "town": town(rng), "age": str(rng.randint(18, 90))}
    n, j, w, a = v["name"], v["job"], v["town"], v["age"]
    return v, [
        f"{n} is a {a} year old {j} who lives in {w}.",
        f"{n} works as a {j} in {w} and is {a} years old.",
        f"Meet {n}, {a}, a {j} from {w}.",
    ]


def _product(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    v = {"product": rng.choice(PRODUCTS), "brand": made_up_word(rng), "colour": rng.choice(COLOURS),
         "price": f"{rng.randint(3, 400)}.{rng.choice(['00', '50', '99'])}"}  # fmt: skip
    p, b, c, m = v["product"], v["brand"], v["colour"], v["price"]
    return v, [
        f"The {b} {p} costs {m} pounds and comes in {c}.",
        f"This {c} {p} from {b} is on sale for {m} pounds.",
        f"{b} makes {'an' if c[0] in 'aeiou' else 'a'} {c} {p} for {m} pounds.",
    ]


def _parcel(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    to, where = person(rng), town(rng)  # this order of draws is the committed corpus's
    code = f"{rng.choice('ABCDEFGHJKLMNPRSTW')}{rng.randint(100, 9999)}"
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"])
    v = {"to": to, "town": where, "code": code, "day": day}
    n, w, c, d = v["to"], v["town"], v["code"], v["day"]
    return v, [
        f"Parcel {c} for {n} in {w} will arrive on {d}.",
        f"On {d} we will deliver parcel {c} to {n} in {w}.",
    ]


RECORDS = [_book, _train, _person, _product, _parcel]


def record(rng: random.Random) -> tuple[str, str, list[str]]:
    """(`key[value], ... => `, the sentence, the values the sentence must copy)."""
    values, sentences = rng.choice(RECORDS)(rng)
    keys = list(values)
    shown = keys if rng.random() < 0.5 else rng.sample(keys, len(keys))
    source = ", ".join(f"{k}[{values[k]}]" for k in shown) + " => "
    return source, rng.choice(sentences), list(values.values())


def _repeat(rng: random.Random) -> str:
    said = " ".join(
        rng.choice([made_up_word(rng).lower(), str(rng.randint(0, 999)), rng.choice(WORDS)])
        for _ in range(rng.randint(2, 5))
    )
    who = made_up_word(rng, (1, 2))
    return rng.choice(
        [
            f"{who} said: {said}. Repeat: {said}.",
            f"Note: {said}. Copy: {said}.",
            f'The password is "{said}". Again, the password is "{said}".',
        ]
    )


def code_document(rng: random.Random) -> str:
    """Random codes said twice: no byte of the repeat is predictable except by finding it earlier,
    the purest signal for the copying circuit (the records' made-up words are partly predictable
    from their own first bytes, which lets a model lower its loss without copying)."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    codes = " ".join("".join(rng.choices(alphabet, k=rng.randint(3, 8))) for _ in range(rng.randint(1, 4)))
    return rng.choice([f"Code: {codes}. Repeat: {codes}.", f"key[{codes}] => The key is {codes}."])


def _visit(rng: random.Random) -> str:
    a, b, w = person(rng), made_up_word(rng, (1, 2)), town(rng)
    first = a.split()[0]
    return (
        f"{a} lives in {w}. One day {first} met {b} at the station. "
        f"{b} asked {first} about {w}, and {first} said that {w} is a quiet place."
    )


def copy_document(rng: random.Random) -> str:
    """One copy-teaching document: 50% records, 15% repeats, 25% random codes, 10% names reused
    in prose."""
    pick = rng.random()
    if pick < 0.5:
        return " ".join("".join(record(rng)[:2]) for _ in range(rng.randint(1, 2)))
    if pick < 0.65:
        return _repeat(rng)
    if pick < 0.9:
        return code_document(rng)
    return _visit(rng)
