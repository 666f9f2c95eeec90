"""A generated English corpus for the demo model: templated sentences in a few domains.

No downloads: restaurant descriptions in the style of the E2E data set (the same slots:
name, eatType, food, priceRange, customer rating, area, familyFriendly, near), greetings
and short dialogue turns, weather reports and small stories, plus copy-teaching records in
other domains (`trainer.copy_corpus`: books, trains, people, ... as `key[value] => sentence`).
`restaurant_sentence` is shared with the table-to-text example so that its references use
the same wording the model was pretrained on, while restaurant meaning representations are never seen in
pretraining (the paper's GPT-2 had seen tables and lists, but never E2E's MRs).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from trainer.copy_corpus import copy_document, made_up_word, town

NAMES = [
    "The Eagle", "The Mill", "The Wrestlers", "The Golden Curry", "The Phoenix", "The Vaults",
    "The Punter", "The Cricketers", "The Olive Grove", "The Rice Boat", "Aromi", "Bibimbap House",
    "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe",
    "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge", "The Dumpling Tree",
    "The Twenty Two", "Wildwood", "Zizzi", "Alimentum", "The Waterman", "The Plough", "Travellers Rest",
]  # fmt: skip
EAT_TYPES = ["coffee shop", "pub", "restaurant"]
FOODS = ["French", "Italian", "English", "Chinese", "Indian", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["riverside", "city centre"]
NEAR = [
    "Burger King", "Café Rouge", "The Bakers", "Raja Indian Cuisine", "Crowne Plaza Hotel",
    "Express by Holiday Inn", "Rainbow Vegetarian Café", "The Portland Arms", "Yippee Noodle Bar",
    "All Bar One", "Café Sicilia", "Avalon", "Ranch", "The Sorrento", "Café Brazil",
]  # fmt: skip
SLOTS = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def random_mr(rng: random.Random) -> dict[str, str]:
    """A meaning representation: name always, each other slot with some probability."""
    mr = {"name": rng.choice(NAMES)}
    choices = {
        "eatType": EAT_TYPES, "food": FOODS, "priceRange": PRICES, "customer rating": RATINGS,
        "area": AREAS, "familyFriendly": ["yes", "no"], "near": NEAR,
    }  # fmt: skip
    for slot, values in choices.items():
        if rng.random() < 0.6:
            mr[slot] = rng.choice(values)
    return mr


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _price(value: str) -> str:
    if "£" not in value:
        return f"with {value} prices"
    return f"with prices in the {value} range" if value[0] == "£" else f"with prices {value}"


def _rating(value: str) -> str:
    return f"a customer rating of {value}" if value[0].isdigit() else _a(value) + " customer rating"


def restaurant_sentence(mr: dict[str, str], rng: random.Random) -> str:
    """One English description of `mr`, every slot realised, wording picked by `rng`."""
    name, kind = mr["name"], mr.get("eatType", rng.choice(["place", "venue"]))
    food = mr.get("food")
    head = rng.choice(
        [
            f"{name} is {_a(kind)}",
            f"There is {_a(kind)} called {name}",
            f"{name} is {_a(food)} {kind}" if food else f"{name} is a nice {kind}",
        ]
    )
    parts = []
    if food and food not in head:
        parts.append(
            rng.choice([f"serving {food} food", f"that serves {food} food", f"offering {food} food"])
        )
    if "area" in mr:
        parts.append(rng.choice([f"in the {mr['area']}", f"located in the {mr['area']} area"]))
    if "near" in mr:
        parts.append(rng.choice([f"near {mr['near']}", f"close to {mr['near']}"]))
    if "priceRange" in mr:
        parts.append(_price(mr["priceRange"]))
    if "customer rating" in mr:
        parts.append(
            rng.choice(
                ["and it has " + _rating(mr["customer rating"]), "with " + _rating(mr["customer rating"])]
            )
        )
    sentence = " ".join([head] + parts) + "."
    if "familyFriendly" in mr:
        friendly = mr["familyFriendly"] == "yes"
        sentence += " " + rng.choice(
            ["It is family friendly." if friendly else "It is not family friendly.",
             "Children are welcome." if friendly else "It is not suitable for children."]
        )  # fmt: skip
    return sentence


VENUE_ENDS = ["Arms", "Inn", "Kitchen", "Cafe", "Tavern", "Bistro", "Grill", "House"]
CITIES = ["Cambridge", "London", "Oxford", "York", "Bristol", "Leeds", "Bath"]


def venue(rng: random.Random, open_names: float) -> str:
    """A venue name: from the closed list, or (share `open_names`) a made-up one."""
    if rng.random() >= open_names:
        return rng.choice(NAMES)
    word = made_up_word(rng)
    ends = rng.choice(VENUE_ENDS), rng.choice(VENUE_ENDS)  # (two draws: the committed corpus's)
    return rng.choice([f"The {word}", f"{word} {ends[0]}", f"The {word} {ends[1]}"])


def _greeting(rng: random.Random, open_names: float = 0.0) -> str:
    name = venue(rng, open_names)
    return rng.choice(
        [
            f"Hello! Welcome to {name}. How can I help you today?",
            f"Hello, and thank you for calling {name}. We are open every day from noon until ten.",
            f"Hello there. I would like to book a table for {rng.randint(2, 8)} people tonight, please.",
            f"Hello! Yes, we have a table for you at {rng.randint(6, 9)} o'clock. See you soon.",
            f"Hi, is {name} near {rng.choice(NEAR)}? Yes, it is just a short walk away.",
            f"Hello, my name is {rng.choice(['Anna', 'Tom', 'Sara', 'Ben', 'Maya'])}. "
            f"I am looking for a {rng.choice(FOODS)} {rng.choice(EAT_TYPES)} in the {rng.choice(AREAS)}.",
            "Hello, how are you? I am fine, thank you. The weather is lovely today.",
            "Good morning! Would you like a cup of coffee and something to eat?",
            "Thank you for your visit. We hope to see you again soon.",
        ]
    )


def _weather(rng: random.Random, open_names: float = 0.0) -> str:
    city = rng.choice(CITIES) if rng.random() >= open_names else town(rng)
    day = rng.choice(["Today", "Tomorrow", "On Monday", "On Friday", "This weekend"])
    sky = rng.choice(["sunny", "cloudy", "rainy", "windy", "foggy", "bright and clear"])
    return (
        f"{day} in {city} it will be {sky} with a high of {rng.randint(5, 28)} degrees"
        f" and a low of {rng.randint(-2, 12)} degrees. "
        + rng.choice(["Take an umbrella.", "It is a good day for a walk.", "Wrap up warm.", "Enjoy the sun."])
    )


def _story(rng: random.Random) -> str:
    who = rng.choice(["The little cat", "A young girl", "The old man", "A happy dog", "The baker"])
    went = rng.choice(["went to the market", "walked by the river", "visited a friend", "found a red ball"])
    then = rng.choice(["It was a good day.", "Then it started to rain.", "Everyone was happy.", "The end."])
    return f"{who} {went} in the morning. {then}"


def document(rng: random.Random, copy_frac: float = 0.4, open_names: float = 0.0) -> str:
    """One short document: `copy_frac` copy-teaching (other domains, `trainer.copy_corpus`), the
    rest restaurants (55%: the worked example needs their wording), greetings (20%), weather
    (15%) and stories (10%). `open_names` of the greetings' venues and the weather's towns are
    made up (a closed list of 32 venues and 7 cities teaches the model to recall one of them
    where a task needs it to copy its input's)."""
    pick = rng.random()
    if pick < copy_frac:
        return copy_document(rng)
    rest = 1.0 - copy_frac
    if pick < copy_frac + rest * 0.55:
        sentences = [restaurant_sentence(random_mr(rng), rng) for _ in range(rng.randint(1, 3))]
        return " ".join(sentences)
    if pick < copy_frac + rest * 0.75:
        return _greeting(rng, open_names)
    if pick < copy_frac + rest * 0.9:
        return _weather(rng, open_names)
    return _story(rng)


def corpus(num_docs: int, seed: int, copy_frac: float = 0.4, open_names: float = 0.0) -> list[str]:
    """`num_docs` documents, deterministic for `seed`."""
    rng = random.Random(seed)
    return [document(rng, copy_frac, open_names) for _ in range(num_docs)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write the demo model's generated corpus (one document a line)."
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.write_text("\n".join(corpus(args.docs, args.seed)) + "\n")


if __name__ == "__main__":
    main()
