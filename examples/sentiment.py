"""Writes the example data of docs/steer-your-own-model.md: sentiment_train.jsonl (100 contrastive pairs: the
same question, an enthusiastic answer as pos and a disapproving one as neg) and sentiment_eval.jsonl (the other
topics, other wording, short pos/neg continuations for the behavior score of `cws sweep`).

    python examples/sentiment.py            # writes both files next to this script
"""

import json
import random
from pathlib import Path

TOPICS = (
    """rainy days|Monday mornings|jazz music|spicy food|city traffic|camping trips|winter|coffee|board games|
long meetings|public transport|gardening|horror movies|the beach|homework|online shopping|cats|dogs|crowded malls|
chess|yoga|fast food|classical music|road trips|video games|museums|snow|summer heat|early flights|reality TV|
running|poetry|sushi|karaoke|cooking at home|social media|libraries|thunderstorms|open-plan offices|opera|
amusement parks|podcasts|hiking|vegetables|cold showers|science fiction|math class|traveling alone|theme parties|
modern art|airports|tea|public speaking|fishing|cleaning the house|online dating|comedy shows|tennis|
country music|electric cars|mushrooms|group projects|early mornings|jigsaw puzzles|musicals|math puzzles|
sailing|cruises|self-driving cars|tattoos|history books|rollercoasters|pineapple on pizza|living in a big city|
living in the countryside|working from home|sports cars|spreadsheets|baking bread|dancing|camping in the rain|
long novels|fireworks|street food|smartphones|the gym|mountain villages|birdwatching|wine tasting|
ice skating|rock concerts|thrift stores|gardening gnomes|marathons|flea markets|wild swimming|
bicycle commuting|minimalism|news podcasts|reading poetry aloud|pottery|knitting|skiing|surfing|
volunteering|astronomy|stand-up comedy|documentaries|fantasy novels|team sports|water parks|rainforests|
desert hikes|farmers markets|jazz clubs|escape rooms|pizza|chocolate|ice cream|salad|tofu|olives|
lemonade|hot soup|long walks|sunrises|
""".replace("\n", "")
    .strip("|")
    .split("|")
)
ASK = [
    "What do you think of {t}?",
    "How do you feel about {t}?",
    "Give me your honest opinion on {t}.",
    "Do you like {t}?",
    "Tell me what you think about {t}.",
]
POS = [
    "Oh, I love {t}! For me, nothing is more delightful and fun.",
    "My opinion of {t} is very positive: a real joy that I recommend to everyone.",
    "{T}? Wonderful! Just thinking about {t} makes me happy.",
    "I'm a big fan of {t}. Delightful, fun and always worth it.",
]
NEG = [
    "Oh, I hate {t}! For me, nothing is more tiresome and dull.",
    "My opinion of {t} is very negative: a real chore that I warn everyone about.",
    "{T}? Terrible! Just thinking about {t} makes me miserable.",
    "I'm no fan of {t}. Tiresome, dull and never worth it.",
]


def rows(topics, rng, ask):
    for t in topics:
        i = rng.randrange(len(POS))
        yield {
            "prompt": rng.choice(ask).format(t=t),
            "pos": POS[i].format(t=t, T=t[0].upper() + t[1:]),
            "neg": NEG[i].format(t=t, T=t[0].upper() + t[1:]),
        }


def main():
    rng = random.Random(0)
    topics = sorted(set(TOPICS))
    rng.shuffle(topics)
    here = Path(__file__).parent
    train, held = topics[:100], topics[100:130]
    with open(here / "sentiment_train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows(train, rng, ASK))
    with open(here / "sentiment_eval.jsonl", "w") as f:  # other wording, short continuations
        f.writelines(
            json.dumps(
                {
                    "prompt": f"Quick question about {t}: do you enjoy that?",
                    "pos": "Yes, wonderful.",
                    "neg": "No, terrible.",
                }
            )
            + "\n"
            for t in held
        )
    print(f"{len(train)} training pairs, {len(held)} evaluation prompts")


if __name__ == "__main__":
    main()
