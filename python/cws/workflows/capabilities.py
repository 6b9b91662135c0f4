"""The built-in capability sets of `cws sweep`: neutral instructions (answered by the unsteered
model, then scored under steering) and plain reference text. Replaceable with --instructions/--text."""

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "Explain what photosynthesis is in two sentences.",
    "Give three tips for staying healthy.",
    "What is machine learning?",
    "Describe a cat to a child.",
    "How do I boil an egg?",
    "Summarize the story of Cinderella.",
    "Why is exercise important?",
    "Write a friendly email inviting a colleague to lunch.",
    "What are the benefits of reading books?",
    "Explain how a rainbow forms.",
    "Suggest a name for a new coffee shop.",
    "What does a computer programmer do?",
    "Give me a recipe idea for dinner.",
    "How can I improve my sleep?",
    "Describe the water cycle.",
    "Write a haiku about autumn.",
    "What is the difference between weather and climate?",
    "List three things to pack for a beach trip.",
    "Explain what gravity is.",
]
TEXTS = [
    "The library opened early on Saturday mornings. Students came with their notebooks and sat by the tall windows, "
    "where the light was best. The librarian knew most of them by name and kept a list of the books they wanted.",
    "Bread is made from flour, water, salt and yeast. The yeast eats sugars in the dough and releases gas, which makes "
    "the bread rise. Baking sets the structure and browns the crust.",
    "The river runs through the valley for nearly two hundred kilometres before it reaches the sea. In spring it "
    "floods the low fields, leaving behind a layer of rich soil that farmers have used for centuries.",
    "A good map shows more than roads. It shows rivers, hills and forests, the names of towns, and the distances "
    "between them, so that a traveller can plan a route before setting out.",
    "Honeybees live in colonies with a single queen, thousands of workers and a few hundred drones. The workers "
    "collect nectar and pollen, build the comb, and care for the young.",
    "The museum's new exhibition covers the history of flight, from early gliders to modern jets. Visitors can sit "
    "in a real cockpit and learn how pilots navigate in bad weather.",
    "Learning a musical instrument takes patience. Short daily practice is usually better than one long session a "
    "week, because the hands and the ear improve through repetition.",
    "The old train station was turned into a market. On weekends local farmers sell vegetables, cheese and bread, "
    "and musicians play near the entrance.",
]
