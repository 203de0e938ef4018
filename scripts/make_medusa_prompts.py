"""Write plugins/speculative/data/medusa_prompts.json: the prompt set `tokenmill train-medusa` distils from.

    python scripts/make_medusa_prompts.py [--seed 0] [--self-instruct 800]

Three kinds, templates x subjects, shuffled with a fixed seed: ``chat`` (explain / list / compare / advise / write
about a topic), ``code`` (write, explain or test a small program in a language), ``grounded`` (summarize, rewrite,
list, fix or translate a text or a piece of code given in the prompt, so the answer copies from its input).
Templates alone are narrow (heads trained on them reached 49 % top-1 on held-out templated prompts but 22 % on
the benchmark's chat prompts), so ``--self-instruct N`` adds N chat requests written by the default model itself
(sampled, temperature 0.9, from "write a request a user might send about KIND, SUBJECT"; ``source:
self-instruct``). The benchmark's prompts (benchmarks/data/*_prompts.json) are not among them: they are the
held-out evaluation.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "plugins" / "speculative" / "data" / "medusa_prompts.json"

TOPICS = [
    "photosynthesis", "the water cycle", "the Roman Empire", "the printing press", "black holes", "vaccines",
    "the internet", "recycling", "volcanoes", "the human heart", "electric cars", "honey bees", "the Moon landing",
    "plate tectonics", "coffee", "the stock market", "climate change", "the French Revolution", "DNA",
    "solar panels", "the Great Wall of China", "compound interest", "sleep", "the immune system", "rainforests",
    "the Olympic Games", "antibiotics", "earthquakes", "the piano", "chess", "bread baking", "glaciers",
    "the Silk Road", "public libraries", "3D printing", "the periodic table", "wind turbines", "octopuses",
    "the Renaissance", "inflation", "gardening", "marathon training", "the microscope", "tides", "jazz",
    "cloud computing", "bicycles", "the Industrial Revolution", "rain", "meditation",
]
CHAT = [
    "Explain {t} to a ten-year-old.", "Summarize {t} in two sentences.", "List five facts about {t}.",
    "Write a short paragraph about {t}.", "What are the pros and cons of {t}?", "Why does {t} matter today?",
    "Write a haiku about {t}.", "Give me three questions a student might ask about {t}, with answers.",
    "Describe {t} step by step.", "What is a common misconception about {t}?",
    "Write a short story that involves {t}.", "How would you teach {t} in a 10-minute lesson?",
    "Write a tweet about {t}.", "Compare {t} with something from everyday life.",
    "What should a beginner read first to learn about {t}?",
]
TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "counts the words in a sentence", "finds the largest element of a list",
    "removes duplicates from a list while keeping order", "checks whether a string is a palindrome",
    "merges two sorted lists", "converts Celsius to Fahrenheit", "sums the digits of an integer",
    "implements binary search", "reads a file and counts its lines", "sorts a list of names alphabetically",
    "computes the average of a list of numbers", "flattens a nested list", "parses a date string like 2024-03-01",
    "implements a stack with push and pop", "returns the greatest common divisor of two numbers",
    "validates an email address with a simple rule", "transposes a matrix", "counts vowels in a string",
    "implements bubble sort", "converts a decimal number to binary",
]
LANGS = ["Python", "JavaScript", "C", "Go", "Rust", "Java"]
CODE = [
    "Write a {l} function that {t}.", "Write a {l} function that {t}, and explain how it works.",
    "Show a short {l} example of a function that {t}, with a test.",
]
PARAGRAPHS = [
    "The town library opened a new reading room last spring. It has tall windows, long oak tables and a corner "
    "for children with soft chairs. On weekends volunteers read stories aloud, and on Tuesday evenings a club "
    "meets to discuss a book chosen by vote. Since the room opened, visits have almost doubled.",
    "Our team moved the weekly meeting from Monday to Wednesday because too many people were travelling at the "
    "start of the week. The meeting now starts at ten and lasts forty minutes. Please add your updates to the "
    "shared document before nine so that we can read them in advance.",
    "To plant a tomato seedling, dig a hole deeper than the pot, remove the lower leaves and bury the stem up to "
    "the first set of leaves. Water it well and put a stake next to it. Tomatoes need at least six hours of sun "
    "a day and should be watered at the base, not on the leaves.",
    "The bridge over the river was built in 1893 from local stone. It has five arches and was widened in 1961 to "
    "carry two lanes of traffic. Engineers inspected it last year and found cracks in the second arch, so the "
    "city plans to close it for repairs during the summer.",
    "Battery life depends on how a phone is used. Bright screens, weak signals and apps running in the "
    "background all drain power quickly. Lowering the brightness, turning off location services and closing "
    "unused apps can add several hours between charges.",
    "Maria started her bakery in a small garage with one oven. She sold bread to neighbours and at the Saturday "
    "market. After three years she rented a shop on the main street, hired two bakers and added cakes and "
    "pastries. Her sourdough is still made with the starter she used on the first day.",
    "The company will replace the old ticketing system in March. Customers will get an email with a link to the "
    "new portal, where they can open requests, attach files and follow the status of each ticket. The old "
    "address will keep working for one month and then forward messages automatically.",
    "Owls hunt mostly at night. Their large eyes gather what little light there is, and their ears are placed "
    "at different heights on the head, which helps them locate sounds exactly. Soft edges on their feathers "
    "let them fly almost silently, so mice rarely hear them coming.",
    "The recipe needs two cups of flour, one cup of milk, two eggs, a spoon of sugar and a pinch of salt. Mix the "
    "dry ingredients first, then whisk in the milk and eggs until smooth. Let the batter rest for ten minutes "
    "and cook the pancakes in a hot pan with a little butter.",
    "During the trip we visited three cities in six days. The first was famous for its old harbour, the second "
    "for its museums and the third for its food markets. Trains between them were fast and cheap, but the hotels "
    "near the stations were noisy, so next time we would stay closer to the centre.",
    "Regular exercise improves mood, sleep and concentration. Adults are advised to be active for at least one "
    "hundred and fifty minutes a week, for example brisk walking, cycling or swimming. Even short walks during "
    "the working day help break up long periods of sitting.",
    "The new software update fixes a bug that made the app crash when uploading large photos. It also adds a "
    "dark mode, speeds up the start screen and changes the settings menu so that privacy options are easier to "
    "find. Users should restart the app after installing the update.",
]
TEXT_TASKS = [
    "Summarize this text in one sentence:\n\n{p}", "Rewrite this text in a more formal tone:\n\n{p}",
    "Turn this text into a bullet list of its main points:\n\n{p}", "Fix any grammar mistakes and repeat the text:\n\n{p}",
    "Rewrite this text for a child:\n\n{p}", "Give this text a title and repeat it below the title:\n\n{p}",
    "Translate this text into French:\n\n{p}", "List every number mentioned in this text and what it refers to:\n\n{p}",
]
SNIPPETS = [
    "def average(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)",
    "def find(items, target):\n    for i in range(len(items)):\n        if items[i] == target:\n            return i\n    return -1",
    "function countWords(s) {\n  let n = 0;\n  for (const w of s.split(' ')) {\n    if (w.length > 0) n++;\n  }\n  return n;\n}",
    "def is_even(n):\n    if n % 2 == 1:\n        return False\n    else:\n        return True",
    "int max(int a, int b) {\n    if (a > b)\n        return a;\n    return b;\n}",
    "def read_config(path):\n    f = open(path)\n    data = f.read()\n    return data.split('\\n')",
    "def fizzbuzz(n):\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            print('FizzBuzz')\n        elif i % 3 == 0:\n            print('Fizz')\n        elif i % 5 == 0:\n            print('Buzz')\n        else:\n            print(i)",
    "def total_price(items):\n    s = 0\n    for name, price, qty in items:\n        s = s + price * qty\n    return s",
    "def first_upper(s):\n    return s[0].upper() + s[1:]",
    "function sum(arr) {\n  var s = 0;\n  for (var i = 0; i <= arr.length; i++) {\n    s += arr[i];\n  }\n  return s;\n}",
]
CODE_TASKS = [
    "Add comments to this code and show the result:\n\n```\n{c}\n```", "Find and fix the bug in this code:\n\n```\n{c}\n```",
    "Explain what this code does, line by line:\n\n```\n{c}\n```", "Rewrite this code with clearer variable names:\n\n```\n{c}\n```",
    "Add type hints or types to this code:\n\n```\n{c}\n```",
]


REQUESTS = [
    "advice about a personal situation", "help writing an email", "a travel plan", "a recipe", "a poem",
    "a short story", "an exercise plan", "advice about money", "help fixing a problem at home", "a study plan",
    "a comparison of two products", "an explanation of a concept", "help with a job application",
    "ideas for a party", "a summary of a historical event", "help choosing a gift", "a weekly meal plan",
    "tips for a hobby", "help writing a speech", "advice about a pet", "a packing list", "a daily schedule",
    "help with a school assignment", "advice about a conflict with a friend", "a product description",
    "a cover letter", "a joke or a limerick", "advice about gardening", "instructions for a craft project",
    "help planning a budget", "a debate argument", "a review of a book or film",
]
SUBJECTS = TOPICS + [
    "a new job", "moving to another city", "a wedding", "a birthday", "a small business", "a vacation", "winter",
    "a first apartment", "learning a language", "a dog", "a cat", "a university exam", "a car", "a neighbour",
    "a family dinner", "a hiking trip", "a garden", "a laptop", "a phone", "saving money", "a concert", "a museum",
]


def self_instruct(n: int, seed: int) -> list[dict]:
    """``n`` chat requests the default model writes itself (sampled; empty and duplicate answers dropped)."""
    from tokenmill import Pipeline, SamplingParams

    rng = random.Random(seed + 1)
    asks = [f"Write one request that a user might send to an AI assistant asking for {rng.choice(REQUESTS)} "
            f"about {rng.choice(SUBJECTS)}. Write only the request itself, in the user's words." for _ in range(n)]
    pipe = Pipeline.from_yaml(ROOT / "pipelines" / "continuous.yaml", progress=False)
    params = [SamplingParams(max_tokens=80, temperature=0.9, top_p=0.95, seed=seed * 100003 + i) for i in range(n)]
    out, seen = [], set()
    for r in pipe.generate(asks, params, chat=True):
        text = r.text.strip().strip('"').strip()
        if len(text) >= 20 and text not in seen and r.finish_reason == "stop":
            seen.add(text)
            out.append({"kind": "chat", "source": "self-instruct", "prompt": text})
    return out


def build(seed: int) -> list[dict]:
    rng = random.Random(seed)
    chat = [{"kind": "chat", "prompt": c.format(t=t)} for t in TOPICS for c in rng.sample(CHAT, 5)]
    code = [{"kind": "code", "prompt": c.format(l=lang, t=t)} for t in TASKS for lang, c in
            zip(rng.sample(LANGS, 3), rng.sample(CODE, 3))]
    grounded = [{"kind": "grounded", "prompt": t.format(p=p)} for p in PARAGRAPHS for t in rng.sample(TEXT_TASKS, 5)]
    grounded += [{"kind": "grounded", "prompt": t.format(c=c)} for c in SNIPPETS for t in rng.sample(CODE_TASKS, 4)]
    prompts = chat + code + grounded
    rng.shuffle(prompts)
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-instruct", type=int, default=0, metavar="N",
                    help="add N chat requests written by the default model (needs the model; ~3 min for 800)")
    args = ap.parse_args()
    prompts = build(args.seed)
    if args.self_instruct:
        prompts += self_instruct(args.self_instruct, args.seed)
        random.Random(args.seed).shuffle(prompts)
    counts = {k: sum(p["kind"] == k for p in prompts) for k in ("chat", "code", "grounded")}
    OUT.write_text(json.dumps({
        "description": "Prompt set for Medusa self-distillation (tokenmill train-medusa), written by "
                       f"scripts/make_medusa_prompts.py --seed {args.seed} --self-instruct {args.self_instruct}: "
                       f"templates x subjects and self-written requests, {counts}.",
        "prompts": prompts}, indent=1) + "\n")
    print(f"wrote {OUT}: {len(prompts)} prompts {counts}")


if __name__ == "__main__":
    main()
