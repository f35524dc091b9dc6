"""Make a tool-use data set: what the tools recipe trains on and `llmkit evaluate` scores tool calls with.

    python recipes/data/tool_use.py                     # -> data/tools/{train,validation}.jsonl
    python recipes/data/tool_use.py --train 400 --validation 50 --out data/tools-small

Every row offers the same three tools (OpenAI's `tools` list): `get_weather(city, unit)`, `convert_units(value,
from_unit, to_unit)` and `calculator(expression)`. A quarter of the questions need no tool (the model must learn
when *not* to call), the rest get an assistant turn with `tool_calls`, the `tool` result, and a final answer that
uses it. Results are computed, not invented: the calculator evaluates the expression, conversions use real
factors, the weather is a fixed function of the city (so a model cannot learn anything false from it).

Validation questions use cities, numbers and phrasings' values the training rows never contain, so
`tool_call_accuracy` measures copying arguments from an unseen question, not memorising them. The rows are the
format `llmkit finetune` reads (README "Training on tool calls"); seeded, so every run makes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a length, mass or volume between units",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression with + - * /",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
]

# Held-out cities never appear in training rows (nor do held-out numbers: see _numbers). Training names are many
# and varied -- real cities of one to four words and several tokens, and made-up ones from syllables -- so that the
# model learns to copy whatever name the question holds. With 30 mostly one-token cities it learned those names
# instead, and misspelled unseen ones ("Santiabal" for Santiago): every miss of tool_call_accuracy was such a copy.
REAL_CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Dublin",
               "Nairobi", "Toronto", "Sydney", "Mumbai", "Lisbon", "Vienna", "Prague", "Athens", "Havana", "Denver",
               "Boston", "Chicago", "Quito", "Hanoi", "Manila", "Dakar", "Helsinki", "Warsaw", "Budapest",
               "Johannesburg", "Reykjavik", "Kathmandu", "Ouagadougou", "San Francisco", "Rio de Janeiro",
               "Ho Chi Minh City", "São Paulo", "Kraków", "Düsseldorf", "Thessaloniki", "Guadalajara", "Marrakesh",
               "Vladivostok", "Ulaanbaatar", "Addis Ababa", "Kuala Lumpur", "Buenos Aires", "Montevideo", "Valparaíso",
               "Brisbane", "Wellington", "Christchurch", "Vancouver", "Winnipeg", "Saskatoon", "Albuquerque",
               "Tallahassee", "Minneapolis", "Pittsburgh", "Philadelphia", "New Orleans", "Salt Lake City",
               "Edinburgh", "Glasgow", "Manchester", "Birmingham", "Rotterdam", "Eindhoven", "Antwerp", "Luxembourg",
               "Strasbourg", "Marseille", "Bordeaux", "Toulouse", "Barcelona", "Valencia", "Seville", "Porto",
               "Florence", "Naples", "Palermo", "Ljubljana", "Zagreb", "Sarajevo", "Bratislava", "Bucharest",
               "Sofia", "Tbilisi", "Yerevan", "Baku", "Tashkent", "Almaty", "Islamabad", "Karachi", "Lahore",
               "Chennai", "Bengaluru", "Hyderabad", "Kolkata", "Colombo", "Dhaka", "Yangon", "Bangkok",
               "Chiang Mai", "Phnom Penh", "Jakarta", "Surabaya", "Shenzhen", "Chongqing", "Guangzhou", "Hangzhou",
               "Osaka", "Sapporo", "Fukuoka", "Busan", "Taipei", "Kaohsiung", "Accra", "Kinshasa", "Luanda",
               "Windhoek", "Gaborone", "Harare", "Lusaka", "Dar es Salaam", "Kampala", "Kigali", "Mogadishu",
               "Tunis", "Algiers", "Casablanca", "Tripoli", "Khartoum", "Beirut", "Amman", "Riyadh", "Doha",
               "Muscat", "Abu Dhabi", "Tehran", "Caracas", "Medellín", "Cartagena", "Guayaquil", "La Paz",
               "Asunción", "Panama City", "San José", "Tegucigalpa", "Managua", "Kingston", "Port-au-Prince",
               "Santo Domingo", "San Juan", "Anchorage", "Honolulu", "Nuuk", "Tromsø", "Gothenburg", "Tampere",
               "Tartu", "Vilnius", "Minsk", "Chișinău", "Novosibirsk", "Yekaterinburg", "Irkutsk"]
HELDOUT_CITIES = ["Zurich", "Kyoto", "Montreal", "Santiago", "Bogota", "Istanbul", "Copenhagen", "Munich",
                  "Auckland", "Lagos"]
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr",
           "v", "w", "z", "ch", "sh", "th", ""]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "y", "é", "ö"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "nd"]
_FORMS = ["{}", "{}", "{}", "{}", "Port {}", "{} Falls", "San {}", "New {}", "{} Bay", "Lake {}", "{}-on-Sea", "{} City"]


def made_up_cities(n: int, seed: int = 12345) -> list[str]:
    """`n` distinct invented place names of two or three syllables, some in two-word forms ("Port Velandor")."""
    rng, names = random.Random(seed), set()
    taken = {c.lower() for c in REAL_CITIES + HELDOUT_CITIES}
    while len(names) < n:
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(2, 3))).capitalize()
        name = rng.choice(_FORMS).format(stem)
        if len(stem) > 3 and stem.lower() not in taken:  # not even inside a two-word name
            names.add(name)
    return sorted(names)


TRAIN_CITIES = REAL_CITIES + made_up_cities(400)
WEATHER_ASKS = ["What is the weather in {city}?", "How is the weather in {city} right now?",
                "Is it warm in {city} today?", "Tell me the current weather in {city}.", "weather {city}?",
                "What's it like outside in {city}?"]
UNITS = {"celsius": ["", " in celsius", " in Celsius, please"], "fahrenheit": [" in fahrenheit", " in Fahrenheit"]}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]

# factor to the base unit of each dimension
FACTORS = {"kilometer": 1000.0, "mile": 1609.344, "meter": 1.0, "foot": 0.3048, "inch": 0.0254,
           "kilogram": 1.0, "pound": 0.45359237, "gram": 0.001, "ounce": 0.028349523125,
           "liter": 1.0, "gallon": 3.785411784, "milliliter": 0.001}
PLURAL = {"foot": "feet", "inch": "inches"}
DIMENSIONS = [["kilometer", "mile", "meter", "foot", "inch"], ["kilogram", "pound", "gram", "ounce"],
              ["liter", "gallon", "milliliter"]]
CONVERT_ASKS = ["How many {to} are in {value} {from_}?", "Convert {value} {from_} to {to}.",
                "What is {value} {from_} in {to}?", "{value} {from_} is how many {to}?"]

OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b),
       "/": ("divided by", lambda a, b: a / b)}
CALC_ASKS = ["What is {a} {word} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {word} {b}, please.", "{a} {op} {b} = ?"]

NO_TOOL = [("Hello!", "Hello! How can I help you today?"),
           ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
           ("What is the capital of France?", "The capital of France is Paris."),
           ("Tell me a fun fact about octopuses.", "An octopus has three hearts."),
           ("Thanks for your help!", "You're welcome!"),
           ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
           ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
           ("What can you do?", "I can look up the weather, convert units and do arithmetic for you."),
           ("Name a primary color.", "Red is a primary color."),
           ("How many days are in a week?", "There are seven days in a week."),
           ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds drift to the east."),
           ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.")]


def _numbers(rng: random.Random, heldout: bool) -> int:
    # training numbers are even, held-out ones odd: no held-out question repeats a training one's values
    n = rng.randint(2, 499)
    return n | 1 if heldout else n & ~1 or 2


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _call_row(question: str, name: str, arguments: dict[str, Any], result: str, answer: str, i: int) -> dict:
    call_id = f"call_{i}"
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
        {"role": "assistant", "content": answer}]}


def weather(rng: random.Random, heldout: bool, i: int) -> dict:
    city = rng.choice(HELDOUT_CITIES if heldout else TRAIN_CITIES)
    unit = rng.choice(list(UNITS))
    question = rng.choice(WEATHER_ASKS).format(city=city).rstrip("?.") + rng.choice(UNITS[unit])
    question += "?" if question.split()[0].lower() in {"what", "how", "is", "what's", "weather"} else "."
    seed = sum(map(ord, city))  # the same city always has the same weather
    celsius = seed % 30 - 2
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    sign = "C" if unit == "celsius" else "F"
    cond = CONDITIONS[seed % len(CONDITIONS)]
    return _call_row(question, "get_weather", {"city": city, "unit": unit}, json.dumps({"condition": cond, "temperature": temp, "unit": sign}),
                     f"It is {cond} in {city}, {temp} °{sign}.", i)


def convert(rng: random.Random, heldout: bool, i: int) -> dict:
    from_unit, to_unit = rng.sample(rng.choice(DIMENSIONS), 2)
    value = _numbers(rng, heldout)
    plural = lambda u: PLURAL.get(u, u + "s")  # noqa: E731
    question = rng.choice(CONVERT_ASKS).format(value=value, from_=plural(from_unit), to=plural(to_unit))
    out = value * FACTORS[from_unit] / FACTORS[to_unit]
    return _call_row(question, "convert_units", {"value": value, "from_unit": from_unit, "to_unit": to_unit},
                     json.dumps({"result": round(out, 4)}), f"{value} {plural(from_unit)} is {_fmt(round(out, 4))} {plural(to_unit)}.", i)


def calculate(rng: random.Random, heldout: bool, i: int) -> dict:
    op = rng.choice(list(OPS))
    a, b = _numbers(rng, heldout), _numbers(rng, heldout)
    word, fn = OPS[op]
    question = rng.choice(CALC_ASKS).format(a=a, b=b, op=op, word=word)
    expression = f"{a} {op} {b}"
    result = round(fn(a, b), 4)
    return _call_row(question, "calculator", {"expression": expression}, json.dumps({"result": result}),
                     f"{expression} = {_fmt(result)}.", i)


def no_tool(rng: random.Random, heldout: bool, i: int) -> dict:
    question, answer = rng.choice(NO_TOOL)
    return {"tools": TOOLS, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def rows(n: int, heldout: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    makers = [weather, convert, calculate, no_tool]
    return [makers[i % len(makers)](rng, heldout, i) for i in range(n)]


def write(path: Path, data: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a killed run leaves no half file
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/tools"), help="output folder")
    ap.add_argument("--train", type=int, default=2000, help="training conversations")
    ap.add_argument("--validation", type=int, default=200, help="held-out conversations (unseen cities and numbers)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for split, n, heldout in (("train", args.train, False), ("validation", args.validation, True)):
        write(args.out / f"{split}.jsonl", rows(n, heldout, args.seed + heldout))
        print(f"{args.out / f'{split}.jsonl'}: {n} conversations")


if __name__ == "__main__":
    main()
